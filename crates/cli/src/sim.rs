//! `tokenfab sim`: replay a trace on a simulated cluster (the production scheduler and
//! router in virtual time) and report latency, goodput, cache hits and cost — for one
//! routing policy or several side by side.

use clap::Args;
use tokenfab_sched::route::Policy;
use tokenfab_sim::cluster::{simulate, Report, SimConfig, SimWorker};
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
    #[command(flatten)]
    replay: Replay,
    /// One JSON object per policy instead of a table.
    #[arg(long)]
    json: bool,
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
    let named = accelerators();
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
            },
            None => SimWorker {
                kind: name.to_owned(),
                profile: StepProfile::parse(name)?,
                kv_tokens: 262_144,
                slots: 128,
                usd_per_hour: 0.0,
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
    // Workers as `tokenfab worker` runs them, with room to queue a whole trace.
    let engine = tokenfab_engine::EngineConfig {
        max_running: 64,
        max_waiting: 1 << 20,
        max_waiting_tokens: u64::MAX >> 1,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let reports: Vec<Report> = policies
        .iter()
        .map(|&policy| {
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
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "policy",
        "ttft p50",
        "ttft p99",
        "tpot p50",
        "tpot p99",
        "e2e p99",
        "hit %",
        "preempt",
        "tok/s",
        "goodput",
        "$/M out"
    );
    for r in &reports {
        println!(
            "{:<20} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>8} {:>8} {:>9.1} {:>8.3} {:>9.4}",
            r.policy,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.tpot_ms.p50,
            r.tpot_ms.p99,
            r.e2e_ms.p99,
            r.prefix_hit_rate * 100.0,
            r.preemptions,
            r.rejected,
            r.output_tok_per_s,
            r.slo_attainment,
            r.usd_per_m_output_tokens
        );
    }
    println!("(ms; refused = turned away by the engines' SLO admission; goodput = share of completed requests meeting the SLO; $/M out = accelerator cost per million output tokens)");
    Ok(())
}
