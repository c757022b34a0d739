//! `tokenfab calibrate`: time the real llama.cpp executor on this machine over a grid of
//! batch shapes, then the live engine loop serving a synthetic workload (`live.rs`); fit
//! the simulator's linear step-time model to the live steps (the grid is the check, or
//! the fit with `--no-live`) and write it as a named profile (by default
//! `cpu:smollm2-135m` in `$TOKENFAB_HOME/profiles.toml`, which overlays the shipped
//! profiles for `tokenfab sim` and `worker --mock`).

mod live;

use clap::Args;
use std::time::Instant;
use tokenfab_engine::{BatchEntry, Executor, SamplingParams};
use tokenfab_llama::{LlamaExecutor, LlamaExecutorConfig, LoadedModel};
use tokenfab_sim::ProfileEntry;
use tokenfab_types::{SeqSlot, TokenId};

#[derive(Args, Clone, Debug)]
pub struct CalibrateArgs {
    /// Model to measure (catalog name, .gguf path, or hf:...).
    #[arg(long, default_value = tokenfab_llama::pull::DEFAULT_MODEL)]
    model: String,
    /// Profile name to write (default: `cpu:smollm2-135m` for the default model, else
    /// `cpu:<model>`).
    #[arg(long)]
    name: Option<String>,
    /// Profile file to update (other entries are kept). Default:
    /// `$TOKENFAB_HOME/profiles.toml`.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Timed runs per batch shape (the median counts).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Kernel threads (0: all cores), as `serve --threads`.
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// KV cells and sequence slots the profile declares (default: `serve`'s).
    #[arg(long)]
    kv_tokens: Option<u32>,
    #[arg(long)]
    slots: Option<u32>,
    /// The machine's price, for cost reports.
    #[arg(long, default_value_t = 0.05)]
    usd_per_hour: f64,
    /// The live pass's workload, a `sim --synthetic` spec served by the real engine loop
    /// with serve's settings; the profile is fitted to its steps.
    #[arg(long, default_value = "poisson:0.5:40:200:32")]
    live: String,
    /// Fit the grid alone (faster, but ~20 % more optimistic than a live server).
    #[arg(long)]
    no_live: bool,
}

/// One measured batch shape.
#[derive(Clone, Debug)]
struct Point {
    what: String,
    tokens: u64,
    seqs: u64,
    kv: u64,
    /// Median step time, seconds.
    secs: f64,
}

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    let pulled = tokenfab_llama::pull::pull(&a.model, &tokenfab_llama::pull::home())?;
    let model = LoadedModel::load(&pulled.path, &pulled.name)?;
    let name = a.name.clone().unwrap_or_else(|| {
        if a.model == tokenfab_llama::pull::DEFAULT_MODEL {
            "cpu:smollm2-135m".to_owned()
        } else {
            format!("cpu:{}", pulled.name)
        }
    });
    let mut exec = LlamaExecutor::new(
        &model,
        &LlamaExecutorConfig {
            kv_tokens: 16_384,
            slots: 32,
            batch_tokens: 1024,
            threads: a.threads,
            ..LlamaExecutorConfig::default()
        },
    )?;
    // Written into the profile, so that the simulator cuts prompts as this engine's
    // scheduler does.
    let fast_prefill_rows = exec.capacity().fast_prefill_rows;
    let repeats = a.repeats.max(1);
    let mut points = Vec::new();
    eprintln!("measuring {} ({repeats} runs per shape)", pulled.name);
    // Prefill: one sequence, one chunk of P tokens.
    for p in [32u64, 64, 128, 256, 512] {
        points.push(measure(
            &mut exec,
            repeats,
            &format!("prefill {p}"),
            &[],
            p,
        )?);
    }
    // Decode: B sequences at short and long contexts.
    for (b, ctx) in [
        (1u64, 64u64),
        (4, 64),
        (8, 64),
        (16, 64),
        (1, 768),
        (4, 768),
        (8, 768),
    ] {
        let what = format!("decode {b} seqs, ctx {ctx}");
        let ctxs = vec![ctx; b as usize];
        points.push(measure(&mut exec, repeats, &what, &ctxs, 0)?);
    }
    // Mixed: decodes with a prefill chunk, as chunked prefill runs them.
    for (b, p) in [(2u64, 128u64), (8, 128), (4, 256)] {
        let what = format!("{b} decodes + prefill {p}");
        let ctxs = vec![128; b as usize];
        points.push(measure(&mut exec, repeats, &what, &ctxs, p)?);
    }
    let grid = points.len();
    if !a.no_live {
        let serve = crate::config::Config::default();
        let exec_cfg = LlamaExecutorConfig {
            kv_tokens: serve.model.kv_tokens,
            layout: serve.model.kv_layout,
            slots: serve.model.slots,
            batch_tokens: serve.scheduler.max_step_tokens,
            ubatch_tokens: serve.model.ubatch_tokens,
            threads: a.threads,
        };
        drop(exec);
        let m = model.clone();
        let live = live::measure(&a.live, serve.engine()?, move || {
            LlamaExecutor::new(&m, &exec_cfg).map_err(|e| e.to_string())
        })?;
        points.extend(live);
    }
    // With live steps, the fit is theirs alone: the same batch shapes ran ~20 % slower in
    // the live loop than back to back in the grid (server threads waking per token take
    // the cores from the kernels' threads), and a simulation must match the server. The
    // grid then shows how far isolated batches are from the fitted model.
    let fitted_on = if points.len() > grid {
        &points[grid..]
    } else {
        &points[..]
    };
    let [base, per_token, per_seq, per_kv] = fit(fitted_on);
    let serve_defaults = crate::config::Config::default().model;
    let entry = ProfileEntry {
        base_ms: round(base * 1e3, 3),
        per_token_us: round(per_token * 1e6, 2),
        per_seq_us: round(per_seq * 1e6, 2),
        per_kv_token_ns: round(per_kv * 1e9, 3),
        kv_tokens: u64::from(a.kv_tokens.unwrap_or(serve_defaults.kv_tokens)),
        slots: a.slots.unwrap_or(serve_defaults.slots),
        usd_per_hour: a.usd_per_hour,
        fast_prefill_rows,
    };
    let fitted = entry.accelerator().profile;
    println!(
        "{:<28} {:>11} {:>11} {:>8}",
        "batch", "measured ms", "model ms", "error"
    );
    let model_s = |p: &Point| fitted.step_time(p.tokens, p.seqs, p.kv).0 as f64 / 1e9;
    let error = |p: &Point| (model_s(p) - p.secs) / p.secs;
    for p in &points[..grid] {
        let err = error(p);
        println!(
            "{:<28} {:>11.2} {:>11.2} {:>7.1}%",
            p.what,
            p.secs * 1e3,
            model_s(p) * 1e3,
            err * 100.0
        );
    }
    // Live steps by kind: their total time (what a simulated run adds up) and the mean
    // error of one step.
    let is_decode: fn(&Point) -> bool = |p| p.tokens == p.seqs;
    for (kind, is_kind) in [
        ("live decode steps", is_decode),
        ("live lone prefill steps", |p| p.seqs == 1 && p.tokens > 1),
        ("live steps mixing prefill", |p| {
            p.seqs > 1 && p.tokens > p.seqs
        }),
    ] {
        let of_kind: Vec<&Point> = points[grid..].iter().filter(|p| is_kind(p)).collect();
        if of_kind.is_empty() {
            continue;
        }
        let measured: f64 = of_kind.iter().map(|p| p.secs).sum();
        let modelled: f64 = of_kind.iter().map(|p| model_s(p)).sum();
        let mean = of_kind.iter().map(|p| error(p).abs()).sum::<f64>() / of_kind.len() as f64;
        println!(
            "{:<28} {:>11.0} {:>11.0} {:>7.1}%  ({} steps, total ms; mean step error {:.1} %)",
            kind,
            measured * 1e3,
            modelled * 1e3,
            (modelled - measured) / measured * 100.0,
            of_kind.len(),
            mean * 100.0
        );
    }
    let errors: Vec<f64> = fitted_on.iter().map(|p| error(p).abs()).collect();
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    let max = errors.iter().copied().fold(0.0, f64::max);
    println!(
        "{name}: base {} ms, {} µs/token, {} µs/sequence, {} ns/KV token; fitted to the {} steps: error mean {:.1} %, max {:.1} %",
        entry.base_ms,
        entry.per_token_us,
        entry.per_seq_us,
        entry.per_kv_token_ns,
        if fitted_on.len() == grid { "grid's" } else { "live" },
        mean * 100.0,
        max * 100.0
    );
    let out = a
        .out
        .clone()
        .unwrap_or_else(tokenfab_sim::user_profiles_path);
    write_entry(&out, &name, &entry)?;
    println!("written to {}", out.display());
    Ok(())
}

/// Median time of a step over sequences at contexts `ctxs` (one decode token each) plus,
/// when `prefill > 0`, one more sequence prefilling `prefill` tokens.
fn measure(
    exec: &mut LlamaExecutor,
    repeats: usize,
    what: &str,
    ctxs: &[u64],
    prefill: u64,
) -> anyhow::Result<Point> {
    let params = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let slots: Vec<SeqSlot> = (0..=ctxs.len() as u32).map(SeqSlot).collect();
    // Untimed: bring the decoding sequences to their contexts.
    for (i, &ctx) in ctxs.iter().enumerate() {
        exec.begin(slots[i], &params);
        let t = filler_tokens(ctx, i as u64);
        exec.run(&[BatchEntry {
            slot: slots[i],
            pos: 0,
            tokens: &t,
            sample: false,
        }])?;
    }
    let last = slots[ctxs.len()];
    let mut times = Vec::new();
    // Each run decodes one more token per sequence; the first run is not timed (warm
    // caches, thread pool).
    for run in 0..=repeats {
        let step: Vec<Vec<TokenId>> = (0..ctxs.len())
            .map(|i| filler_tokens(1, 1000 + (i + run) as u64))
            .collect();
        let fresh = filler_tokens(prefill, 99 + run as u64);
        let mut batch: Vec<BatchEntry<'_>> = ctxs
            .iter()
            .enumerate()
            .map(|(i, &ctx)| BatchEntry {
                slot: slots[i],
                pos: ctx + run as u64,
                tokens: &step[i],
                sample: true,
            })
            .collect();
        if prefill > 0 {
            exec.begin(last, &params);
            batch.push(BatchEntry {
                slot: last,
                pos: 0,
                tokens: &fresh,
                sample: true,
            });
        }
        let started = Instant::now();
        exec.run(&batch)?;
        let secs = started.elapsed().as_secs_f64();
        if run > 0 {
            times.push(secs);
        }
        exec.release(last);
    }
    for s in slots {
        exec.release(s);
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    // Contexts grew by one token per run: the middle run's.
    let kv = ctxs.iter().map(|c| c + 1 + repeats as u64 / 2).sum::<u64>() + prefill;
    let seqs = ctxs.len() as u64 + u64::from(prefill > 0);
    eprintln!("  {what}: {:.2} ms", secs * 1e3);
    Ok(Point {
        what: what.to_owned(),
        tokens: ctxs.len() as u64 + prefill,
        seqs,
        kv,
        secs,
    })
}

/// `n` ordinary vocabulary tokens; different salts (below 2,000) share no prefix.
fn filler_tokens(n: u64, salt: u64) -> Vec<TokenId> {
    (0..n)
        .map(|k| TokenId(100 + ((k * 31 + salt * 7) % 2000) as i32))
        .collect()
}

/// Least squares in relative error (rows weighted by 1/time): the coefficients of
/// `time ≈ base + per_token·tokens + per_seq·seqs + per_kv·kv`, none negative (a
/// coefficient the fit drives below zero is dropped and the rest refitted).
fn fit(points: &[Point]) -> [f64; 4] {
    let row = |p: &Point| [1.0, p.tokens as f64, p.seqs as f64, p.kv as f64];
    let mut active = [true; 4];
    loop {
        let idx: Vec<usize> = (0..4).filter(|&k| active[k]).collect();
        let n = idx.len();
        // Normal equations AᵀA x = Aᵀb over the active columns.
        let mut m = vec![vec![0.0; n + 1]; n];
        for p in points {
            let w = 1.0 / p.secs;
            let r = row(p);
            for (i, &ki) in idx.iter().enumerate() {
                for (j, &kj) in idx.iter().enumerate() {
                    m[i][j] += r[ki] * w * r[kj] * w;
                }
                m[i][n] += r[ki] * w * p.secs * w;
            }
        }
        let x = solve(m);
        let mut out = [0.0; 4];
        for (i, &k) in idx.iter().enumerate() {
            out[k] = x[i];
        }
        match (0..4).find(|&k| active[k] && out[k] < 0.0) {
            Some(k) => active[k] = false,
            None => return out,
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented n×(n+1) matrix.
fn solve(mut m: Vec<Vec<f64>>) -> Vec<f64> {
    let n = m.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))
            .unwrap_or(c);
        m.swap(c, p);
        if m[c][c].abs() < 1e-300 {
            continue;
        }
        let pivot = m[c].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            if m[i][i] == 0.0 {
                0.0
            } else {
                m[i][n] / m[i][i]
            }
        })
        .collect()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Replace (or add) `name` in the profile file at `path`, keeping its other entries.
fn write_entry(path: &std::path::Path, name: &str, entry: &ProfileEntry) -> anyhow::Result<()> {
    let mut all = match std::fs::read_to_string(path) {
        Ok(text) => tokenfab_sim::parse_profiles(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        Err(_) => Default::default(),
    };
    all.insert(name.to_owned(), entry.clone());
    #[derive(serde::Serialize)]
    struct File<'a> {
        profiles: &'a std::collections::BTreeMap<String, ProfileEntry>,
    }
    let text = format!(
        "# Written by `tokenfab calibrate`; overlays the profiles shipped with tokenfab.\n{}",
        toml::to_string(&File { profiles: &all })?
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_a_profile_keeps_the_files_other_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profiles.toml");
        let entry = |base_ms| ProfileEntry {
            base_ms,
            per_token_us: 1.0,
            per_seq_us: 2.0,
            per_kv_token_ns: 0.5,
            kv_tokens: 1024,
            slots: 8,
            usd_per_hour: 0.1,
            fast_prefill_rows: 64,
        };
        write_entry(&path, "cpu:a", &entry(1.0)).expect("write");
        write_entry(&path, "cpu:b", &entry(2.0)).expect("write");
        write_entry(&path, "cpu:a", &entry(3.0)).expect("rewrite");
        let text = std::fs::read_to_string(&path).expect("read");
        let all = tokenfab_sim::parse_profiles(&text).expect("parses");
        assert_eq!(all["cpu:a"], entry(3.0));
        assert_eq!(all["cpu:b"], entry(2.0));
        std::fs::write(&path, "[profiles.broken]\nbase_ms = \"x\"\n").expect("write");
        assert!(
            write_entry(&path, "cpu:a", &entry(1.0)).is_err(),
            "a broken file is not overwritten"
        );
    }

    #[test]
    fn the_fit_recovers_a_linear_model() {
        let truth =
            |t: u64, s: u64, kv: u64| 0.003 + 2e-4 * t as f64 + 1e-3 * s as f64 + 5e-8 * kv as f64;
        let points: Vec<Point> = [
            (1, 1, 64),
            (8, 8, 512),
            (512, 1, 512),
            (130, 3, 900),
            (16, 16, 12_000),
            (64, 1, 64),
        ]
        .into_iter()
        .map(|(tokens, seqs, kv)| Point {
            what: String::new(),
            tokens,
            seqs,
            kv,
            secs: truth(tokens, seqs, kv),
        })
        .collect();
        let [b, t, s, kv] = fit(&points);
        for (got, want) in [(b, 0.003), (t, 2e-4), (s, 1e-3), (kv, 5e-8)] {
            assert!((got - want).abs() <= want * 1e-6, "{got} vs {want}");
        }
    }
}
