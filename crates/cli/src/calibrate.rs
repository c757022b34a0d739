//! `tokenfab calibrate`: time the real llama.cpp executor on this machine over a grid of
//! batch shapes in serve's KV layout, fit the simulator's linear step-time model to them
//! (the shapes separate its terms: prefill and decode rows, shallow and deep attention),
//! optionally scale it to the steps of a live engine loop (`--live`, `live.rs`), and
//! write it as a named profile (by default `cpu:smollm2-135m` in
//! `$TOKENFAB_HOME/profiles.toml`, which overlays the shipped profiles for `tokenfab sim`
//! and `worker --mock`).

mod live;
mod server_log;

use clap::Args;
use std::time::Instant;
use tokenfab_engine::{BatchEntry, Executor, SamplingParams};
use tokenfab_llama::{LlamaExecutor, LlamaExecutorConfig, LoadedModel};
use tokenfab_sim::{ProfileEntry, StepShape};
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
    /// Also run a live pass: the real engine loop, in this process with serve's settings,
    /// serving this `sim --synthetic` workload (e.g. `poisson:0.5:40:200:32`, ~80 s);
    /// the grid's model is then scaled to its steps. Off by default: on the Xeon where
    /// the grid was last checked against `serve`, serve's steps matched the grid's model
    /// within 7 % by kind while this in-process loop ran single decodes at 25–29 ms, not
    /// 11 (ARCHITECTURE.md, Simulator step times and fidelity).
    #[arg(long)]
    live: Option<String>,
    /// The profile's `step_noise` (sd of ln(real / modelled step time)). Default: the
    /// spread of the grid's repeated runs, a floor — serve's own steps spread ~0.1 around
    /// the model on the 2-core test machine (ARCHITECTURE.md, Simulator step times and
    /// fidelity).
    #[arg(long, conflicts_with = "server_log")]
    step_noise: Option<f64>,
    /// Set `step_noise` from a real server's steps instead: the spread of
    /// ln(measured / modelled) around its mean over every "llama step" event in this
    /// JSON log of `serve` (record it with `RUST_LOG=info,tokenfab_llama=trace tokenfab
    /// --log-format json serve 2> FILE` while it serves a workload, e.g. `sim --against`).
    /// Read before the grid runs, so a bad file fails fast.
    #[arg(long)]
    server_log: Option<std::path::PathBuf>,
    /// Also write every measured step (grid and live), one JSON line each: its batch
    /// shape and time, for a look at the fit.
    #[arg(long)]
    steps: Option<std::path::PathBuf>,
}

/// One measured batch shape.
#[derive(Clone, Debug, serde::Serialize)]
struct Point {
    what: String,
    shape: StepShape,
    /// Median step time, seconds.
    secs: f64,
    /// `ln(time / median)` of each timed run (empty for live steps, timed once).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    spread: Vec<f64>,
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
    // The grid runs in serve's KV layout: in the per-sequence one a decode row reads its
    // own stream only, in the unified one every cell in use, so the attention terms
    // differ between them.
    let serve = crate::config::Config::default();
    let exec_cfg = LlamaExecutorConfig {
        kv_tokens: serve.model.kv_tokens,
        layout: serve.model.kv_layout,
        slots: serve.model.slots,
        batch_tokens: serve.scheduler.max_step_tokens,
        ubatch_tokens: serve.model.ubatch_tokens,
        threads: a.threads,
    };
    let mut exec = LlamaExecutor::new(&model, &exec_cfg)?;
    // Written into the profile, so that the simulator cuts prompts as this engine's
    // scheduler does, and used to tell the kernels' two attention paths apart.
    let fast_prefill_rows = exec.capacity().fast_prefill_rows;
    let server_steps = match &a.server_log {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(anyhow::Error::from)
                .and_then(|text| server_log::read(&text, fast_prefill_rows))
                .map_err(|e| anyhow::anyhow!("--server-log {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let repeats = a.repeats.max(1);
    let mut points = Vec::new();
    eprintln!("measuring {} ({repeats} runs per shape)", pulled.name);
    let mut grid_point = |what: String, ctxs: &[u64], prefill: Prefill| {
        measure(&mut exec, fast_prefill_rows, repeats, what, ctxs, prefill)
    };
    // Prefill: one sequence, one chunk of P tokens, at the start of a prompt and deep in
    // one (attention over what is already computed).
    for (tokens, depth) in [
        (32u64, 0u64),
        (64, 0),
        (128, 0),
        (256, 0),
        (512, 0),
        (32, 1024),
        (64, 1024),
        (128, 2048),
        (256, 3072),
    ] {
        let what = format!("prefill {tokens} at {depth}");
        points.push(grid_point(what, &[], Prefill { tokens, depth })?);
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
        (1, 2048),
        (16, 384),
        // Where a chat server's batches mostly are: a few sequences of a few hundred
        // tokens (without these the fit's decode rows there were ~7 % cheap).
        (2, 256),
        (3, 256),
        (6, 256),
    ] {
        let what = format!("decode {b} seqs, ctx {ctx}");
        points.push(grid_point(what, &vec![ctx; b as usize], Prefill::NONE)?);
    }
    // Mixed: decodes with a prefill chunk, as chunked prefill runs them.
    for (b, ctx, tokens, depth) in [
        (2u64, 128u64, 128u64, 0u64),
        (8, 128, 128, 0),
        (4, 128, 256, 0),
        (8, 256, 64, 1024),
        (4, 256, 32, 0),
    ] {
        let what = format!("{b} decodes + prefill {tokens} at {depth}");
        points.push(grid_point(
            what,
            &vec![ctx; b as usize],
            Prefill { tokens, depth },
        )?);
    }
    let grid = points.len();
    if let Some(spec) = &a.live {
        drop(exec);
        let m = model.clone();
        let live = live::measure(spec, serve.engine()?, move || {
            LlamaExecutor::new(&m, &exec_cfg).map_err(|e| e.to_string())
        })?;
        points.extend(live);
    }
    // The grid's shapes tell the terms apart (prefill and decode rows, shallow and deep
    // attention); live steps, when measured, give the level: the grid's model times a
    // factor, plus a fixed cost per step.
    let [base, per_token, per_seq, per_kv, per_prefill_kv] = fit(&points[..grid]
        .iter()
        .map(|p| (terms(&p.shape), p.secs))
        .collect::<Vec<_>>());
    let grid_model = |s: &StepShape| {
        let t = terms(s);
        base + per_token * t[1] + per_seq * t[2] + per_kv * t[3] + per_prefill_kv * t[4]
    };
    let [scale, extra] = if points.len() > grid {
        let live: Vec<_> = (points[grid..].iter())
            .map(|p| ([grid_model(&p.shape), 1.0], p.secs))
            .collect();
        match fit(&live) {
            [s, b] if s > 0.0 => [s, b],
            _ => [1.0, 0.0],
        }
    } else {
        [1.0, 0.0]
    };
    let serve_defaults = serve.model;
    let mut entry = ProfileEntry {
        base_ms: round((base * scale + extra) * 1e3, 3),
        per_token_us: round(per_token * scale * 1e6, 2),
        per_seq_us: round(per_seq * scale * 1e6, 2),
        per_kv_token_ns: round(per_kv * scale * 1e9, 3),
        per_prefill_kv_token_ns: round(per_prefill_kv * scale * 1e9, 3),
        kv_tokens: u64::from(a.kv_tokens.unwrap_or(serve_defaults.kv_tokens)),
        slots: a.slots.unwrap_or(serve_defaults.slots),
        usd_per_hour: a.usd_per_hour,
        fast_prefill_rows,
        step_noise: round(
            a.step_noise
                .unwrap_or_else(|| step_noise(&points[..grid]))
                .max(0.0),
            3,
        ),
    };
    let fitted = entry.accelerator().profile;
    println!(
        "{:<30} {:>11} {:>11} {:>8} {:>11} {:>8}",
        "batch", "measured ms", "grid fit", "error", "profile", "error"
    );
    let model_s = |p: &Point| fitted.step_time(&p.shape).0 as f64 / 1e9;
    let error = |p: &Point| (model_s(p) - p.secs) / p.secs;
    for p in &points[..grid] {
        println!(
            "{:<30} {:>11.2} {:>11.2} {:>7.1}% {:>11.2} {:>7.1}%",
            p.what,
            p.secs * 1e3,
            grid_model(&p.shape) * 1e3,
            (grid_model(&p.shape) - p.secs) / p.secs * 100.0,
            model_s(p) * 1e3,
            error(p) * 100.0
        );
    }
    // Live steps by kind: their total time (what a simulated run adds up) and the mean
    // error of one step.
    let is_decode: fn(&Point) -> bool = |p| p.shape.decodes_only();
    for (kind, is_kind) in [
        ("live decode steps", is_decode),
        ("live lone prefill steps", |p| {
            p.shape.seqs == 1 && p.shape.tokens > 1
        }),
        ("live steps mixing prefill", |p| {
            p.shape.seqs > 1 && p.shape.tokens > p.shape.seqs
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
            "{:<30} {:>11.0} {:>11} {:>8} {:>11.0} {:>7.1}%  ({} steps, total ms; mean step error {:.1} %)",
            kind,
            measured * 1e3,
            "",
            "",
            modelled * 1e3,
            (modelled - measured) / measured * 100.0,
            of_kind.len(),
            mean * 100.0
        );
    }
    let fitted_on = if points.len() > grid {
        &points[grid..]
    } else {
        &points[..]
    };
    let errors: Vec<f64> = fitted_on.iter().map(|p| error(p).abs()).collect();
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    let max = errors.iter().copied().fold(0.0, f64::max);
    println!(
        "{name}: base {} ms, {} µs/token, {} µs/sequence, {} ns/KV token read by a decode row, {} ns/KV token read by a prefill row; the grid's model ×{scale:.3} {:+.2} ms a step; error against the {} steps: mean {:.1} %, max {:.1} %",
        entry.base_ms,
        entry.per_token_us,
        entry.per_seq_us,
        entry.per_kv_token_ns,
        entry.per_prefill_kv_token_ns,
        extra * 1e3,
        if fitted_on.len() == grid { "grid's" } else { "live" },
        mean * 100.0,
        max * 100.0
    );
    // The server's spread around the model just fitted (its speed against the grid's
    // is printed, not counted: the machine's speed drifts between the two).
    if let Some(steps) = &server_steps {
        entry.step_noise = round(server_log::report(&fitted, steps)?.sd, 3);
    }
    if let Some(path) = &a.steps {
        let mut text = String::new();
        for p in &points {
            text.push_str(&serde_json::to_string(p)?);
            text.push('\n');
        }
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("--steps {}: {e}", path.display()))?;
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(tokenfab_sim::user_profiles_path);
    write_entry(&out, &name, &entry)?;
    println!("written to {}", out.display());
    Ok(())
}

/// A prefill piece of `tokens` tokens starting at position `depth` of its prompt.
#[derive(Clone, Copy)]
struct Prefill {
    tokens: u64,
    depth: u64,
}

impl Prefill {
    const NONE: Prefill = Prefill {
        tokens: 0,
        depth: 0,
    };
}

/// The step-time model's terms for a shape: fixed, tokens, sequences, KV cells read
/// row by row, KV cells read by tiled prefill rows.
fn terms(s: &StepShape) -> [f64; 5] {
    [
        1.0,
        s.tokens as f64,
        s.seqs as f64,
        s.row_kv as f64,
        s.tiled_kv as f64,
    ]
}

/// Median time of a step over sequences at contexts `ctxs` (one decode token each) plus,
/// when `prefill.tokens > 0`, one more sequence computing that piece.
fn measure(
    exec: &mut LlamaExecutor,
    fast_rows: u32,
    repeats: usize,
    what: String,
    ctxs: &[u64],
    prefill: Prefill,
) -> anyhow::Result<Point> {
    let params = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let slots: Vec<SeqSlot> = (0..=ctxs.len() as u32).map(SeqSlot).collect();
    let last = slots[ctxs.len()];
    // Untimed: bring the decoding sequences to their contexts, the prefilling one to
    // its depth.
    let lead = ctxs
        .iter()
        .map(|&c| (c, false))
        .chain([(prefill.depth, true)]);
    for (i, (ctx, prefilling)) in lead.enumerate() {
        if ctx == 0 || (prefilling && prefill.tokens == 0) {
            continue;
        }
        exec.begin(slots[i], &params);
        let t = filler_tokens(ctx, i as u64);
        // In pieces the executor's batch holds.
        let piece = exec.capacity().max_batch_tokens.max(1) as usize;
        for (k, chunk) in t.chunks(piece).enumerate() {
            exec.run(&[BatchEntry {
                slot: slots[i],
                pos: (k * piece) as u64,
                tokens: chunk,
                sample: false,
            }])?;
        }
    }
    let mut times = Vec::new();
    let mut shapes = Vec::new();
    // Each run decodes one more token per sequence; the first run is not timed (warm
    // caches, thread pool).
    for run in 0..=repeats {
        let step: Vec<Vec<TokenId>> = (0..ctxs.len())
            .map(|i| filler_tokens(1, 1000 + (i + run) as u64))
            .collect();
        let fresh = filler_tokens(prefill.tokens, 99 + run as u64);
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
        if prefill.tokens > 0 {
            exec.begin(last, &params);
            batch.push(BatchEntry {
                slot: last,
                pos: prefill.depth,
                tokens: &fresh,
                sample: true,
            });
        }
        let started = Instant::now();
        exec.run(&batch)?;
        let secs = started.elapsed().as_secs_f64();
        if run > 0 {
            times.push(secs);
            shapes.push(StepShape::of_batch(fast_rows, &batch));
        }
        exec.trim(last, prefill.depth);
    }
    for s in slots {
        exec.release(s);
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    // Contexts grew by one token per run: the middle run's.
    let shape = shapes[shapes.len() / 2];
    eprintln!("  {what}: {:.2} ms", secs * 1e3);
    let spread = times.iter().map(|t| (t / secs).ln()).collect();
    Ok(Point {
        what,
        shape,
        secs,
        spread,
    })
}

/// The spread of a step's time around its shape's median over the grid's repeated
/// runs, as a standard deviation of the log (the profile's `step_noise`). A floor: in a
/// server, steps also share the cores with HTTP, tokenizing and streaming.
fn step_noise(points: &[Point]) -> f64 {
    // Each shape's runs spend one degree of freedom on its centre.
    let freedom: usize = points
        .iter()
        .map(|p| p.spread.len().saturating_sub(1))
        .sum();
    if freedom == 0 {
        return 0.0;
    }
    let squares: f64 = points.iter().flat_map(|p| &p.spread).map(|d| d * d).sum();
    (squares / freedom as f64).sqrt()
}

/// `n` ordinary vocabulary tokens; different salts (below 2,000) share no prefix.
fn filler_tokens(n: u64, salt: u64) -> Vec<TokenId> {
    (0..n)
        .map(|k| TokenId(100 + ((k * 31 + salt * 7) % 2000) as i32))
        .collect()
}

/// Least squares in relative error (rows weighted by 1/time): the coefficients `x` of
/// `time ≈ Σ x_k · row_k`, none negative (a coefficient the fit drives below zero is
/// dropped and the rest refitted).
fn fit<const N: usize>(rows: &[([f64; N], f64)]) -> [f64; N] {
    let mut active = [true; N];
    loop {
        let idx: Vec<usize> = (0..N).filter(|&k| active[k]).collect();
        let n = idx.len();
        // Normal equations AᵀA x = Aᵀb over the active columns.
        let mut m = vec![vec![0.0; n + 1]; n];
        for (r, secs) in rows {
            let w = 1.0 / secs;
            for (i, &ki) in idx.iter().enumerate() {
                for (j, &kj) in idx.iter().enumerate() {
                    m[i][j] += r[ki] * w * r[kj] * w;
                }
                m[i][n] += r[ki] * w * secs * w;
            }
        }
        let x = solve(m);
        let mut out = [0.0; N];
        for (i, &k) in idx.iter().enumerate() {
            out[k] = x[i];
        }
        match (0..N).find(|&k| active[k] && out[k] < 0.0) {
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
    fn step_noise_pools_each_shapes_spread_around_its_median() {
        let point = |spread: Vec<f64>| Point {
            what: String::new(),
            shape: StepShape::default(),
            secs: 1.0,
            spread,
        };
        // Two shapes of three runs: 4 squared deviations of 0.1 over 2 × 2 freedoms.
        let pts = [point(vec![-0.1, 0.0, 0.1]), point(vec![0.0, 0.1, -0.1])];
        assert!((step_noise(&pts) - 0.1).abs() < 1e-12);
        // A shape timed once says nothing about spread.
        assert_eq!(step_noise(&[point(vec![0.0])]), 0.0);
    }

    #[test]
    fn writing_a_profile_keeps_the_files_other_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profiles.toml");
        let entry = |base_ms| ProfileEntry {
            base_ms,
            per_token_us: 1.0,
            per_seq_us: 2.0,
            per_kv_token_ns: 0.5,
            per_prefill_kv_token_ns: 0.1,
            kv_tokens: 1024,
            slots: 8,
            usd_per_hour: 0.1,
            fast_prefill_rows: 64,
            step_noise: 0.05,
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
        let truth = [0.003, 2e-4, 1e-3, 5e-6, 8e-7];
        let rows: Vec<([f64; 5], f64)> = [
            StepShape::of(64, [(0, 1)]),
            StepShape::of(64, (0..8).map(|i| (60 + i, 1))),
            StepShape::of(64, [(0, 512)]),
            StepShape::of(64, [(1024, 64)]),
            StepShape::of(64, [(100, 1), (200, 1), (0, 128)]),
            StepShape::of(64, [(0, 32), (700, 1)]),
            StepShape::of(64, (0..16).map(|i| (750 + i, 1))),
        ]
        .iter()
        .map(|s| {
            let t = terms(s);
            (t, (0..5).map(|k| truth[k] * t[k]).sum())
        })
        .collect();
        let got = fit(&rows);
        for (got, want) in got.iter().zip(truth) {
            assert!((got - want).abs() <= want * 1e-6, "{got} vs {want}");
        }
        // A term the data drives negative is dropped, not kept below zero.
        let flat = [([1.0, 1.0], 2.0), ([1.0, 2.0], 1.9), ([1.0, 3.0], 1.8)];
        let [b, slope] = fit(&flat);
        assert_eq!(slope, 0.0);
        assert!((b - 1.9).abs() < 0.05, "{b}");
    }
}
