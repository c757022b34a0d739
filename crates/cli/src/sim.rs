//! `tokenfab sim`: replay a trace on a simulated cluster (the production scheduler and
//! router in virtual time) and report latency, goodput, cache hits and cost — for one
//! routing policy or several side by side.

use clap::Args;
use tokenfab_sched::route::Policy;
use tokenfab_sim::cluster::{pcts, simulate, Pcts, Report, SimConfig, SimWorker};
use tokenfab_sim::trace::TraceRequest;
use tokenfab_sim::{accelerators, StepProfile};
use tokenfab_types::Nanos;

#[derive(Args, Clone, Debug)]
pub struct SimArgs {
    /// Trace to replay (Azure CSV, Mooncake or ShareGPT JSONL).
    #[arg(
        long,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    trace: Option<std::path::PathBuf>,
    /// A generated trace instead: `poisson:RATE:COUNT:PROMPT:OUTPUT[:GROUPS:SHARED]` or
    /// `gamma:RATE:CV:COUNT:PROMPT:OUTPUT[:GROUPS:SHARED]` (seeded by --seed).
    #[arg(long)]
    synthetic: Option<String>,
    /// The fleet: `PROFILE=COUNT[,PROFILE=COUNT...]`, a profile being a name from the
    /// profile file (cpu:smollm2-135m, h100:llama2-70b, a100:llama2-70b) or
    /// `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]`.
    #[arg(long)]
    workers: String,
    /// Routing policy.
    #[arg(long, default_value = "prefix-load")]
    policy: String,
    /// Several policies on the same trace and seed, side by side (comma-separated).
    #[arg(long)]
    compare: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// TTFT target, ms (goodput counts requests meeting every target).
    #[arg(long)]
    slo_ttft_ms: Option<u64>,
    /// Time-per-output-token target, ms.
    #[arg(long)]
    slo_tpot_ms: Option<u64>,
    /// Whether routers and engines turn away requests predicted to miss the SLO
    /// (tokenfab's admission), or schedule everything as engines without SLO admission
    /// do; `both` runs every policy each way. Goodput is judged against the SLO either way.
    #[arg(long, value_enum, default_value_t = Admission::Slo)]
    admission: Admission,
    #[command(flatten)]
    replay: Replay,
    /// One JSON object per policy instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw the TTFT distributions and the load over time of every policy (SVG).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Fidelity check: also replay the trace against this server (one engine, e.g.
    /// `tokenfab serve` on this machine) and print measured and simulated TTFT and TPOT
    /// side by side. The simulation then uses the server's defaults (`serve`'s scheduler
    /// settings) and the token counts the server reported; --workers names one worker.
    #[arg(long)]
    against: Option<String>,
    /// With --against: output tokens per request at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// With --against: replay the trace this many times and compare the simulation with
    /// the median run (each percentile's median across runs); the measured range is
    /// printed beside it. One replay on a shared machine varies by more than 15 %. Each
    /// replay sends its own text, so none finds an earlier one's prompts in the cache.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    repeat: u32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Admission {
    Slo,
    Off,
    Both,
}

impl Admission {
    /// The `slo_admission` settings to run, in report order.
    fn modes(self) -> &'static [bool] {
        match self {
            Admission::Slo => &[true],
            Admission::Off => &[false],
            Admission::Both => &[true, false],
        }
    }
}

/// How a trace is replayed (`sim`, and `bench --trace`).
#[derive(Args, Clone, Debug)]
pub struct Replay {
    /// Multiply arrival times (0.1 = ten times the rate).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Multiply prompt lengths (to fit a small model's context).
    #[arg(long, default_value_t = 1.0)]
    pub length_scale: f64,
    /// Only the first N requests of the trace (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
}

impl Replay {
    /// The trace at `path`, cut and scaled.
    pub fn read(&self, path: &std::path::Path) -> anyhow::Result<Vec<TraceRequest>> {
        let mut trace = tokenfab_sim::trace::read(path)?;
        if self.limit > 0 {
            trace.truncate(self.limit);
        }
        tokenfab_sim::trace::scale(&mut trace, self.time_scale, self.length_scale);
        Ok(trace)
    }
}

/// `PROFILE=COUNT,...` → workers.
pub fn parse_workers(spec: &str) -> anyhow::Result<Vec<SimWorker>> {
    let named = accelerators()?;
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (name, count) = part.rsplit_once('=').unwrap_or((part, "1"));
        let count: usize = count
            .parse()
            .map_err(|_| anyhow::anyhow!("--workers: bad count in {part:?}"))?;
        let w = match named.get(name) {
            Some(a) => SimWorker {
                kind: name.to_owned(),
                profile: a.profile,
                kv_tokens: a.kv_tokens,
                slots: a.slots,
                usd_per_hour: a.usd_per_hour,
                fast_prefill_rows: a.fast_prefill_rows,
                step_noise: a.step_noise,
            },
            None => SimWorker {
                kind: name.to_owned(),
                profile: StepProfile::parse(name)?,
                kv_tokens: 262_144,
                slots: 128,
                usd_per_hour: 0.0,
                fast_prefill_rows: 1,
                step_noise: 0.0,
            },
        };
        out.extend(std::iter::repeat_n(w, count));
    }
    if out.is_empty() {
        anyhow::bail!("--workers names no worker");
    }
    Ok(out)
}

pub fn run(a: SimArgs) -> anyhow::Result<()> {
    let trace = match (&a.trace, &a.synthetic) {
        (Some(path), _) => a.replay.read(path)?,
        (None, Some(spec)) => {
            let mut t = tokenfab_sim::trace::synthetic(spec, a.seed)?;
            if a.replay.limit > 0 {
                t.truncate(a.replay.limit);
            }
            tokenfab_sim::trace::scale(&mut t, a.replay.time_scale, a.replay.length_scale);
            t
        }
        (None, None) => anyhow::bail!("give --trace FILE or --synthetic SPEC"),
    };
    let workers = parse_workers(&a.workers)?;
    let names = a.compare.clone().unwrap_or_else(|| a.policy.clone());
    let policies: Vec<Policy> = names
        .split(',')
        .map(|p| {
            Policy::parse(p.trim()).ok_or_else(|| {
                let all: Vec<&str> = Policy::ALL.iter().map(|p| p.as_str()).collect();
                anyhow::anyhow!("unknown policy {p:?}; use one of {}", all.join(", "))
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(url) = &a.against {
        return fidelity(&a, url, trace, workers, policies[0]);
    }
    let engine = queue_whole_trace(tokenfab_engine::EngineConfig {
        max_running: 64,
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let reports: Vec<Report> = policies
        .iter()
        .flat_map(|&policy| a.admission.modes().iter().map(move |&adm| (policy, adm)))
        .map(|(policy, slo_admission)| {
            simulate(
                &trace,
                &SimConfig {
                    workers: workers.clone(),
                    policy,
                    engine: engine.clone(),
                    slo: tokenfab_sched::Slo {
                        ttft: a.slo_ttft_ms.map(Nanos::from_millis),
                        tpot: a.slo_tpot_ms.map(Nanos::from_millis),
                    },
                    slo_admission,
                    seed: a.seed,
                },
            )
        })
        .collect();
    // Wall time is the simulator's speed, not part of the (deterministic) report.
    let wall = started.elapsed().as_secs_f64();
    let events: u64 = reports.iter().map(|r| r.events).sum();
    eprintln!(
        "simulated {events} events in {wall:.2} s ({:.0} events/s, {:.0} requests/s)",
        events as f64 / wall.max(1e-9),
        (trace.len() * reports.len()) as f64 / wall.max(1e-9)
    );
    if let Some(path) = &a.plot {
        crate::plot::write(path, &reports)?;
        eprintln!("plot written to {}", path.display());
    }
    if a.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{} requests on {} workers ({})",
        trace.len(),
        workers.len(),
        a.workers
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6} {:>9}",
        "policy",
        "ttft p50",
        "ttft p99",
        "tpot p50",
        "tpot p99",
        "e2e p99",
        "hit %",
        "preempt",
        "refused",
        "tok/s",
        "good/s",
        "slo %",
        "$/M out"
    );
    for r in &reports {
        println!(
            "{:<28} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>8} {:>8} {:>9.1} {:>8.2} {:>6.1} {:>9.4}",
            r.label(),
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.tpot_ms.p50,
            r.tpot_ms.p99,
            r.e2e_ms.p99,
            r.prefix_hit_rate * 100.0,
            r.preemptions,
            r.rejected,
            r.output_tok_per_s,
            r.goodput_rps,
            r.slo_attainment * 100.0,
            r.usd_per_m_output_tokens
        );
    }
    println!("(ms; refused = turned away by SLO admission, 'no adm.' = SLO admission off; good/s = completed requests meeting every SLO per second; slo % = their share of completed requests; $/M out = accelerator cost per million output tokens)");
    println!(
        "{:<28} {:>10} {:>10} {:>30}",
        "policy", "jain work", "jain ttft", "queue p99 by band (ms)"
    );
    for r in &reports {
        let bands: Vec<String> = r
            .queue_ms_by_band
            .iter()
            .map(|(b, p)| format!("{b} {:.1}", p.p99))
            .collect();
        println!(
            "{:<28} {:>10.3} {:>10.3} {:>30}",
            r.label(),
            r.jain_workers,
            r.jain_tenant_ttft,
            bands.join(", ")
        );
    }
    if reports.iter().any(|r| r.tenants.len() > 1) {
        println!(
            "{:<28} {:>7} {:>9} {:>9} {:>9} {:>10}",
            "policy", "tenant", "requests", "ttft p50", "ttft p99", "queue p99"
        );
        for r in &reports {
            for t in &r.tenants {
                println!(
                    "{:<28} {:>7} {:>9} {:>9.1} {:>9.1} {:>10.1}",
                    r.label(),
                    t.tenant,
                    t.requests,
                    t.ttft_ms.p50,
                    t.ttft_ms.p99,
                    t.queue_ms.p99
                );
            }
        }
    }
    Ok(())
}

/// Simulated workers run `engine`, with room to queue a whole trace.
fn queue_whole_trace(engine: tokenfab_engine::EngineConfig) -> tokenfab_engine::EngineConfig {
    tokenfab_engine::EngineConfig {
        max_waiting: 1 << 20,
        max_waiting_tokens: u64::MAX >> 1,
        ..engine
    }
}

/// `--against URL`: the same trace on the real server and in the simulator.
fn fidelity(
    a: &SimArgs,
    url: &str,
    mut trace: Vec<TraceRequest>,
    workers: Vec<SimWorker>,
    policy: Policy,
) -> anyhow::Result<()> {
    if workers.len() != 1 {
        anyhow::bail!(
            "--against compares one server with one simulated worker: --workers PROFILE=1"
        );
    }
    for r in &mut trace {
        r.output_tokens = r.output_tokens.clamp(1, u64::from(a.max_tokens));
    }
    let mut runs = Vec::with_capacity(a.repeat as usize);
    // Each replay its own text, new to the server: a repeat — or another fidelity check
    // against the same server — would otherwise hit the prefix cache an earlier replay
    // filled, and measure a warm server against a cold simulation.
    let salt: u64 = rand::random();
    for run in 1..=a.repeat {
        eprintln!(
            "replaying {} requests against {url} ({run} of {})",
            trace.len(),
            a.repeat
        );
        runs.push(crate::bench::replay(
            url,
            &trace,
            a.max_tokens,
            salt.wrapping_add(u64::from(run)),
        )?);
    }
    // The workload as the server counted it in the first run: its tokenizer and chat
    // template decide the prompt length, the model's end token may stop a generation
    // early, and the template's opening (a default system prompt) is the same in every
    // prompt, so the server's prefix cache serves it to all but the first. (Modelled for
    // traces whose prompts share nothing else; in one with shared blocks the opening
    // would shift them, which trace blocks of one size cannot say.)
    for m in &runs[0] {
        let r = &mut trace[m.index];
        if let Some(p) = m.prompt_tokens {
            r.input_tokens = p;
        }
        if let Some(c) = m.completion_tokens {
            r.output_tokens = c.max(1);
        }
    }
    let shared = template_prefix(&runs[0]);
    if shared > 0 && trace.iter().all(|r| r.blocks.is_empty()) {
        eprintln!("the server reused a {shared}-token prefix common to every prompt");
        for r in &mut trace {
            r.blocks = vec![TEMPLATE_BLOCK];
            r.block_tokens = shared;
        }
    }
    // A profile with step-time noise is simulated under several seeds, like the server
    // is replayed several times, and each percentile compared median to median.
    let seeds = if workers[0].step_noise > 0.0 { 9 } else { 1 };
    let engine = queue_whole_trace(crate::config::Config::default().engine()?);
    let sims: Vec<_> = (0..seeds)
        .map(|k| {
            simulate(
                &trace,
                &SimConfig {
                    workers: workers.clone(),
                    policy,
                    // The server runs serve's defaults; so does its simulated twin.
                    engine: engine.clone(),
                    slo: tokenfab_sched::Slo::default(),
                    slo_admission: true,
                    seed: a.seed.wrapping_add(k),
                },
            )
        })
        .collect();
    let ttft: Vec<Pcts> = runs
        .iter()
        .map(|run| pcts(run.iter().map(|m| m.ttft_ms).collect()))
        .collect();
    let tpot: Vec<Pcts> = runs
        .iter()
        .map(|run| {
            pcts(
                run.iter()
                    .filter(|m| m.completion_tokens.unwrap_or(2) > 1)
                    .map(|m| m.tpot_ms)
                    .collect(),
            )
        })
        .collect();
    println!(
        "{} requests: {url} ({} run{}) vs simulated {} ({} completed{})",
        trace.len(),
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        workers[0].kind,
        sims[0].completed,
        if seeds > 1 {
            format!(
                "; median of {seeds} seeds, step noise {}",
                workers[0].step_noise
            )
        } else {
            String::new()
        }
    );
    println!(
        "{:<10} {:>10} {:>19} {:>10} {:>8}",
        "ms", "measured", "measured range", "simulated", "diff"
    );
    let row = |name: String, runs: Vec<f64>, simulated: f64| {
        let spread = Spread::of(runs);
        let diff = (simulated - spread.median) / spread.median.max(1e-9) * 100.0;
        let range = format!("{:.1}–{:.1}", spread.min, spread.max);
        println!(
            "{name:<10} {:>10.1} {range:>19} {simulated:>10.1} {diff:>7.1}%",
            spread.median
        );
    };
    let rows = |what: &str, real: &[Pcts], simulated: Vec<Pcts>| {
        let column = |pick: fn(&Pcts) -> f64, runs: &[Pcts]| runs.iter().map(pick).collect();
        for (name, pick) in [
            ("p50", (|p: &Pcts| p.p50) as fn(&Pcts) -> f64),
            ("p90", |p: &Pcts| p.p90),
            ("p99", |p: &Pcts| p.p99),
        ] {
            let simulated = Spread::of(column(pick, &simulated)).median;
            row(format!("{what} {name}"), column(pick, real), simulated);
        }
    };
    rows("ttft", &ttft, sims.iter().map(|s| s.ttft_ms).collect());
    rows("tpot", &tpot, sims.iter().map(|s| s.tpot_ms).collect());
    Ok(())
}

/// The trace block standing for the prefix a server's chat template gives every prompt.
const TEMPLATE_BLOCK: u64 = u64::MAX / 3;

/// Prompt tokens the server reused for most requests of a replay whose prompts share no
/// text (the median of the non-zero `cached_tokens`): what its chat template puts before
/// every prompt, to the granularity of its prefix cache. 0 when nothing was reused.
fn template_prefix(run: &[crate::bench::Measured]) -> u64 {
    let mut cached: Vec<u64> = run
        .iter()
        .filter_map(|m| m.cached_tokens)
        .filter(|&c| c > 0)
        .collect();
    cached.sort_unstable();
    cached.get(cached.len() / 2).copied().unwrap_or(0)
}

/// Median and range of one percentile over repeated measured runs.
#[derive(Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// `runs` is non-empty (`--repeat` is at least 1). An even count takes the mean of
    /// the two middle runs.
    fn of(mut runs: Vec<f64>) -> Spread {
        runs.sort_by(f64::total_cmp);
        let n = runs.len();
        let median = if n % 2 == 1 {
            runs[n / 2]
        } else {
            (runs[n / 2 - 1] + runs[n / 2]) / 2.0
        };
        Spread {
            median,
            min: runs[0],
            max: runs[n - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn spread_takes_the_median_run_and_the_range() {
        let s = Spread::of(vec![1500.0, 1343.0, 1856.0]);
        assert_eq!(
            s,
            Spread {
                median: 1500.0,
                min: 1343.0,
                max: 1856.0
            }
        );
        assert_eq!(Spread::of(vec![4.0, 2.0]).median, 3.0);
        assert_eq!(Spread::of(vec![7.0]).median, 7.0);
    }

    #[test]
    fn the_template_prefix_is_what_most_requests_reused() {
        let run = |cached: &[Option<u64>]| -> Vec<crate::bench::Measured> {
            (cached.iter().enumerate())
                .map(|(index, &cached_tokens)| crate::bench::Measured {
                    index,
                    class: "trace",
                    sent_ms: 0.0,
                    ttft_ms: 1.0,
                    e2e_ms: 2.0,
                    max_itl_ms: 1.0,
                    tpot_ms: 1.0,
                    prompt_tokens: Some(200),
                    completion_tokens: Some(8),
                    cached_tokens,
                })
                .collect()
        };
        // The first request is cold; one happened to share a word more.
        let r = run(&[Some(0), Some(24), Some(24), Some(28), Some(24)]);
        assert_eq!(super::template_prefix(&r), 24);
        assert_eq!(super::template_prefix(&run(&[Some(0), None])), 0);
    }
}
