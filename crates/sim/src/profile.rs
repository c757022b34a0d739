//! A step-time profile: how long one batch takes on the modelled accelerator.

use std::collections::BTreeMap;
use tokenfab_types::Nanos;

/// Linear step time: `base + per_token × tokens in the batch + per_seq × sequences +
/// per_kv × KV cells read by rows computed one by one + per_prefill_kv × KV cells read
/// by rows of tiled prefill pieces` (see [`StepShape`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepProfile {
    pub base: Nanos,
    pub per_token: Nanos,
    pub per_seq: Nanos,
    /// Picoseconds per KV cell a row reads on the row-by-row attention path (decode rows,
    /// prefill pieces shorter than the fast path): attention cost grows with context.
    pub per_kv_ps: u64,
    /// Picoseconds per KV cell a row of a tiled prefill piece reads: a deep chunk costs
    /// more than a shallow one, at a lower rate per cell than a decode row.
    pub per_prefill_kv_ps: u64,
}

/// What one step's time depends on, read off its batch: tokens, sequences, and the
/// attention work — (query row, KV cell) pairs, a row at position `p` reading `p + 1`
/// cells — split by the kernel path that computes it. Pieces of at least `fast_rows`
/// rows (`ExecutorCapacity::fast_prefill_rows`) take the tiled path; decode rows and
/// shorter pieces are computed row by row, which on llama.cpp's CPU flash attention is
/// several times dearer per cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepShape {
    pub tokens: u64,
    pub seqs: u64,
    pub row_kv: u64,
    pub tiled_kv: u64,
}

impl StepShape {
    /// The shape of a batch whose entries each compute `n` tokens from position `pos`.
    pub fn of(fast_rows: u32, entries: impl IntoIterator<Item = (u64, u64)>) -> StepShape {
        let mut s = StepShape::default();
        for (pos, n) in entries {
            s.tokens += n;
            s.seqs += 1;
            let pairs = n * pos + n * (n + 1) / 2;
            if n > 1 && n >= u64::from(fast_rows) {
                s.tiled_kv += pairs;
            } else {
                s.row_kv += pairs;
            }
        }
        s
    }

    /// Whether every entry decodes one token (no prompt piece in the step).
    pub fn decodes_only(&self) -> bool {
        self.tokens == self.seqs
    }

    /// The shape of an executor's batch (see [`StepShape::of`]).
    pub fn of_batch(fast_rows: u32, batch: &[tokenfab_engine::BatchEntry<'_>]) -> StepShape {
        StepShape::of(
            fast_rows,
            batch.iter().map(|e| (e.pos, e.tokens.len() as u64)),
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("unknown profile {0:?}: use `instant`, `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]` or a named profile (cpu:smollm2-135m, h100:llama2-70b, a100:llama2-70b), optionally followed by `,fail-every=N`")]
    Unknown(String),
    #[error("invalid profile file: {0}")]
    File(String),
}

/// What `--mock` runs: a step-time profile and, for fault-injection tests, a step that
/// fails every `fail_every` steps (as a crashed kernel or lost device would).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MockSpec {
    pub profile: StepProfile,
    pub fail_every: Option<u64>,
}

impl MockSpec {
    /// `PROFILE[,fail-every=N]`, e.g. `linear:2:50,fail-every=9`.
    pub fn parse(s: &str) -> Result<MockSpec, ProfileError> {
        let mut parts = s.split(',');
        let profile = StepProfile::parse(parts.next().unwrap_or_default())?;
        let mut spec = MockSpec {
            profile,
            fail_every: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("fail-every", n)) => {
                    let n = n.parse::<u64>().ok().filter(|n| *n > 0);
                    spec.fail_every = Some(n.ok_or_else(|| ProfileError::Unknown(s.to_owned()))?);
                }
                _ => return Err(ProfileError::Unknown(s.to_owned())),
            }
        }
        Ok(spec)
    }
}

/// A modelled accelerator running one model: its step times and capacity, from
/// `data/profiles.toml` (each entry cites its measurements and its fit error).
#[derive(Clone, Debug, PartialEq)]
pub struct Accelerator {
    pub profile: StepProfile,
    pub kv_tokens: u64,
    pub slots: u32,
    pub usd_per_hour: f64,
    /// Fewest rows a prefill piece needs for the kernels' fast path (1: no threshold).
    pub fast_prefill_rows: u32,
    /// Spread of real step times around the profile's: the standard deviation of
    /// `ln(measured / modelled)` (0: every step takes exactly what the profile says).
    pub step_noise: f64,
}

/// `t` scaled by a lognormal factor of mean 1 and log-spread `sigma`, drawn from `key`
/// (a worker's, from the run's seed) and `step`: seeded, and independent of the order
/// in which the simulator's threads reach workers, so a report stays reproducible.
pub fn jitter(t: Nanos, sigma: f64, key: u64, step: u64) -> Nanos {
    if sigma <= 0.0 {
        return t;
    }
    let a = splitmix(key ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let b = splitmix(a);
    // Box-Muller on two uniforms in (0, 1].
    let u = |x: u64| ((x >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let z = (-2.0 * u(a).ln()).sqrt() * (std::f64::consts::TAU * u(b)).cos();
    Nanos((t.0 as f64 * (sigma * z - sigma * sigma / 2.0).exp()).round() as u64)
}

/// SplitMix64's output function: a well-mixed 64-bit hash of `x`.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(serde::Deserialize)]
struct ProfileFile {
    profiles: BTreeMap<String, ProfileEntry>,
}

/// One entry of a profile file (`data/profiles.toml`, or the one `tokenfab calibrate`
/// writes).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileEntry {
    pub base_ms: f64,
    pub per_token_us: f64,
    pub per_seq_us: f64,
    /// Per KV cell read by a row computed alone (decode rows; see [`StepShape`]).
    #[serde(default)]
    pub per_kv_token_ns: f64,
    /// Per KV cell read by a row of a tiled prefill piece.
    #[serde(default)]
    pub per_prefill_kv_token_ns: f64,
    pub kv_tokens: u64,
    pub slots: u32,
    pub usd_per_hour: f64,
    /// Fewest rows of one sequence's prefill piece that take the kernels' fast path, as
    /// the executor reports it (`ExecutorCapacity::fast_prefill_rows`); the simulated
    /// scheduler cuts prompts as the real one does. Default 1: no threshold.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub fast_prefill_rows: u32,
    /// Standard deviation of `ln(real / modelled step time)` over a real server's steps;
    /// the simulator draws each step's time from it (seeded). Default 0: deterministic.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub step_noise: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl ProfileEntry {
    pub fn accelerator(&self) -> Accelerator {
        Accelerator {
            profile: StepProfile {
                base: Nanos::from_secs_f64(self.base_ms / 1e3),
                per_token: Nanos::from_secs_f64(self.per_token_us / 1e6),
                per_seq: Nanos::from_secs_f64(self.per_seq_us / 1e6),
                per_kv_ps: (self.per_kv_token_ns.max(0.0) * 1e3).round() as u64,
                per_prefill_kv_ps: (self.per_prefill_kv_token_ns.max(0.0) * 1e3).round() as u64,
            },
            kv_tokens: self.kv_tokens,
            slots: self.slots,
            usd_per_hour: self.usd_per_hour,
            fast_prefill_rows: self.fast_prefill_rows.max(1),
            step_noise: self.step_noise.max(0.0),
        }
    }
}

const PROFILES: &str = include_str!("../data/profiles.toml");

/// The file `tokenfab calibrate` writes, overlaying the shipped profiles.
pub fn user_profiles_path() -> std::path::PathBuf {
    tokenfab_types::home().join("profiles.toml")
}

/// Entries of a profile file.
pub fn parse_profiles(text: &str) -> Result<BTreeMap<String, ProfileEntry>, String> {
    toml::from_str::<ProfileFile>(text)
        .map(|f| f.profiles)
        .map_err(|e| e.to_string())
}

/// The named profiles (`cpu:smollm2-135m`, `h100:llama2-70b`, ...): the shipped ones,
/// overlaid by those in [`user_profiles_path`] (a calibrated CPU profile replaces the
/// shipped one). A user file that does not parse is an error, not silently ignored.
pub fn accelerators() -> Result<BTreeMap<String, Accelerator>, ProfileError> {
    let mut all = parse_profiles(PROFILES).map_err(ProfileError::File)?;
    let user = user_profiles_path();
    if let Ok(text) = std::fs::read_to_string(&user) {
        let extra = parse_profiles(&text)
            .map_err(|e| ProfileError::File(format!("{}: {e}", user.display())))?;
        all.extend(extra);
    }
    Ok(all.into_iter().map(|(k, e)| (k, e.accelerator())).collect())
}

impl StepProfile {
    /// `instant` (no time at all), `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]`, or a named
    /// profile from `data/profiles.toml` (e.g. `h100:llama2-70b`).
    pub fn parse(s: &str) -> Result<StepProfile, ProfileError> {
        if s == "instant" {
            return Ok(StepProfile::default());
        }
        if let Some(a) = accelerators()?.get(s) {
            return Ok(a.profile);
        }
        let err = || ProfileError::Unknown(s.to_owned());
        let rest = s.strip_prefix("linear:").ok_or_else(err)?;
        let nums: Vec<f64> = rest
            .split(':')
            .map(|p| p.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0))
            .collect::<Option<_>>()
            .ok_or_else(err)?;
        match nums.as_slice() {
            [base_ms, tok_us] | [base_ms, tok_us, _] => Ok(StepProfile {
                base: Nanos::from_secs_f64(base_ms / 1e3),
                per_token: Nanos::from_secs_f64(tok_us / 1e6),
                per_seq: Nanos::from_secs_f64(nums.get(2).copied().unwrap_or(0.0) / 1e6),
                per_kv_ps: 0,
                per_prefill_kv_ps: 0,
            }),
            _ => Err(err()),
        }
    }

    /// How long a step of this shape takes.
    pub fn step_time(&self, s: &StepShape) -> Nanos {
        let kv_ps = self
            .per_kv_ps
            .saturating_mul(s.row_kv)
            .saturating_add(self.per_prefill_kv_ps.saturating_mul(s.tiled_kv));
        Nanos(
            self.base.0
                + self.per_token.0.saturating_mul(s.tokens)
                + self.per_seq.0.saturating_mul(s.seqs)
                + kv_ps / 1000,
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_shape_splits_attention_work_by_kernel_path() {
        // Two decodes at contexts 9 and 99, a 3-row piece from 10, a 64-row one from 100.
        let s = StepShape::of(64, [(8, 1), (98, 1), (10, 3), (100, 64)]);
        assert_eq!((s.tokens, s.seqs), (69, 4));
        assert_eq!(s.row_kv, 9 + 99 + (11 + 12 + 13));
        assert_eq!(s.tiled_kv, 64 * 100 + 64 * 65 / 2);
        // Without a fast-path threshold every piece of several rows is tiled.
        let g = StepShape::of(1, [(8, 1), (10, 3)]);
        assert_eq!((g.row_kv, g.tiled_kv), (9, 36));
        let p = StepProfile {
            per_kv_ps: 2_000,
            per_prefill_kv_ps: 500,
            ..Default::default()
        };
        assert_eq!(
            p.step_time(&s).0,
            (s.row_kv * 2_000 + s.tiled_kv * 500) / 1000
        );
    }

    #[test]
    fn the_profile_file_parses_and_names_resolve() {
        let all = super::accelerators().expect("profiles");
        assert!(all.len() >= 3, "{:?}", all.keys());
        let h100 = super::StepProfile::parse("h100:llama2-70b").expect("named");
        assert_eq!(h100, all["h100:llama2-70b"].profile);
        assert!(h100.step_time(&StepShape::of(1, [(0, 1)])).0 > 28_000_000);
    }

    use super::*;

    #[test]
    fn jitter_is_seeded_with_mean_one_and_the_asked_spread() {
        let t = Nanos(10_000_000);
        assert_eq!(jitter(t, 0.0, 1, 2), t);
        assert_eq!(jitter(t, 0.1, 1, 2), jitter(t, 0.1, 1, 2));
        assert_ne!(jitter(t, 0.1, 1, 2), jitter(t, 0.1, 1, 3));
        let logs: Vec<f64> = (0..20_000)
            .map(|step| (jitter(t, 0.1, 7, step).0 as f64 / t.0 as f64).ln())
            .collect();
        let n = logs.len() as f64;
        let mean_factor = logs.iter().map(|l| l.exp()).sum::<f64>() / n;
        let mean = logs.iter().sum::<f64>() / n;
        let sd = (logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((mean_factor - 1.0).abs() < 0.005, "{mean_factor}");
        assert!((sd - 0.1).abs() < 0.005, "{sd}");
    }

    #[test]
    fn profiles_parse() {
        assert_eq!(StepProfile::parse("instant"), Ok(StepProfile::default()));
        let p = StepProfile::parse("linear:10:50:200").expect("valid");
        let shape = StepShape {
            tokens: 100,
            seqs: 2,
            ..StepShape::default()
        };
        assert_eq!(p.step_time(&shape), Nanos(10_000_000 + 5_000_000 + 400_000));
        assert!(StepProfile::parse("h100").is_err());
        assert!(StepProfile::parse("linear:-1:2").is_err());
        let m = MockSpec::parse("linear:1:2,fail-every=9").expect("valid");
        assert_eq!((m.profile.base, m.fail_every), (Nanos(1_000_000), Some(9)));
        assert_eq!(MockSpec::parse("instant"), Ok(MockSpec::default()));
        assert!(MockSpec::parse("instant,fail-every=0").is_err());
        assert!(MockSpec::parse("instant,explode").is_err());
    }
}
