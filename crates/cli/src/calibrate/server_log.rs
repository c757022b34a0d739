//! `calibrate --server-log FILE`: the spread of a real server's steps around a profile,
//! read from `serve`'s JSON log (`tokenfab --log-format json serve` with
//! `RUST_LOG=info,tokenfab_llama=trace`, whose "llama step" events carry each step's
//! (slot, position, tokens) entries and its time). It becomes the profile's
//! `step_noise`: the grid's isolated, repeated batches spread far less than a server's
//! steps do, which share the cores with HTTP, tokenizing and streaming.

use tokenfab_sim::{StepProfile, StepShape};

/// One step of the server: its shape and its time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerStep {
    pub shape: StepShape,
    pub ms: f64,
}

/// The "llama step" events of a JSON log, in order; other lines (other events, human
/// log lines, the pull's progress) are skipped. Errors when none is found, naming how
/// to record one.
pub fn read(text: &str, fast_rows: u32) -> anyhow::Result<Vec<ServerStep>> {
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &event["fields"];
        if fields["message"] != "llama step" {
            continue;
        }
        let bad = || anyhow::anyhow!("line {}: a \"llama step\" event without slots or ms", i + 1);
        let slots = fields["slots"].as_str().ok_or_else(bad)?;
        let ms = fields["ms"].as_f64().ok_or_else(bad)?;
        let entries = entries(slots).ok_or_else(bad)?;
        steps.push(ServerStep {
            shape: StepShape::of(fast_rows, entries),
            ms,
        });
    }
    if steps.is_empty() {
        anyhow::bail!(
            "no \"llama step\" events: record the log with \
             `RUST_LOG=info,tokenfab_llama=trace tokenfab --log-format json serve 2> FILE`"
        );
    }
    Ok(steps)
}

/// `(pos, tokens)` of each `(slot, pos, tokens)` triple in the event's `slots` field, as
/// `Debug` prints a vector of tuples: `[(0, 12, 1), (3, 40, 1)]`.
fn entries(slots: &str) -> Option<Vec<(u64, u64)>> {
    let numbers = slots
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>().ok())
        .collect::<Option<Vec<_>>>()?;
    (numbers.len() % 3 == 0 && !numbers.is_empty())
        .then(|| numbers.chunks(3).map(|t| (t[1], t[2])).collect())
}

/// `ln(measured / modelled)` over a set of steps: its mean (the server's speed against
/// the profile's: a machine's speed drifts between a log and a calibration) and its
/// standard deviation around that mean (the noise the profile should draw from).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub steps: usize,
    pub mean: f64,
    pub sd: f64,
}

impl Spread {
    pub fn of<'a>(
        profile: &StepProfile,
        steps: impl IntoIterator<Item = &'a ServerStep>,
    ) -> Option<Spread> {
        let logs: Vec<f64> = steps
            .into_iter()
            .map(|s| (s.ms / (profile.step_time(&s.shape).0 as f64 / 1e6)).ln())
            .filter(|r| r.is_finite())
            .collect();
        if logs.len() < 2 {
            return None;
        }
        let n = logs.len() as f64;
        let mean = logs.iter().sum::<f64>() / n;
        let var = logs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Some(Spread {
            steps: logs.len(),
            mean,
            sd: var.sqrt(),
        })
    }

    fn print(&self, kind: &str) {
        println!(
            "server steps, {kind:<13} {:>6} steps: {:+.1} % against the profile (geometric mean), sd of ln(measured / modelled) {:.3}",
            self.steps,
            (self.mean.exp() - 1.0) * 100.0,
            self.sd
        );
    }
}

/// Print the server's spread around `profile`, overall and by kind, and return the
/// overall one.
pub fn report(profile: &StepProfile, steps: &[ServerStep]) -> anyhow::Result<Spread> {
    let overall = Spread::of(profile, steps)
        .ok_or_else(|| anyhow::anyhow!("the server log holds fewer than two usable steps"))?;
    overall.print("all");
    let decode = |s: &&ServerStep| s.shape.decodes_only();
    let kinds = [
        (
            "decode only",
            Spread::of(profile, steps.iter().filter(decode)),
        ),
        (
            "with prefill",
            Spread::of(profile, steps.iter().filter(|s| !decode(s))),
        ),
    ];
    for (kind, spread) in kinds {
        if let Some(s) = spread {
            s.print(kind);
        }
    }
    Ok(overall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_step_events_of_a_json_log_and_skips_the_rest() {
        let log = [
            "tokenfab: smollm2-135m-instruct is cached at /x.gguf",
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"engine ready"},"target":"tokenfab::serve"}"#,
            r#"{"timestamp":"t","level":"TRACE","fields":{"message":"llama step","tokens":2,"seqs":2,"slots":"[(0, 12, 1), (3, 40, 1)]","ms":11.5},"target":"tokenfab_llama::executor"}"#,
            r#"{"timestamp":"t","level":"TRACE","fields":{"message":"llama step","tokens":100,"seqs":1,"slots":"[(1, 0, 100)]","ms":250.0},"target":"tokenfab_llama::executor"}"#,
        ]
        .join("\n");
        let steps = read(&log, 64).expect("two steps");
        assert_eq!(
            steps,
            vec![
                ServerStep {
                    shape: StepShape::of(64, [(12, 1), (40, 1)]),
                    ms: 11.5
                },
                ServerStep {
                    shape: StepShape::of(64, [(0, 100)]),
                    ms: 250.0
                },
            ]
        );
        assert_eq!(steps[1].shape.tiled_kv, 100 * 101 / 2);
    }

    #[test]
    fn a_log_without_steps_or_with_a_broken_one_is_a_clear_error() {
        let err = read("hello\n{\"fields\":{\"message\":\"x\"}}", 64).expect_err("no steps");
        assert!(
            err.to_string()
                .contains("RUST_LOG=info,tokenfab_llama=trace"),
            "{err}"
        );
        let broken = r#"{"fields":{"message":"llama step","slots":"[(0, 1)]","ms":1.0}}"#;
        assert!(read(broken, 64)
            .expect_err("two numbers")
            .to_string()
            .contains("line 1"));
    }

    #[test]
    fn the_spread_is_around_the_servers_own_speed() {
        let profile = StepProfile {
            base: tokenfab_types::Nanos(10_000_000),
            ..StepProfile::default()
        };
        let step = |ms| ServerStep {
            shape: StepShape::of(64, [(0, 1)]),
            ms,
        };
        // Twice as slow as modelled, spread e^±0.1 around that.
        let steps = [step(20.0 * 0.1f64.exp()), step(20.0 * (-0.1f64).exp())];
        let s = Spread::of(&profile, &steps).expect("spread");
        assert!((s.mean - 2f64.ln()).abs() < 1e-9, "{s:?}");
        // Two deviations of 0.1 over one degree of freedom.
        assert!((s.sd - 0.02f64.sqrt()).abs() < 1e-9, "{s:?}");
    }
}
