//! The cluster simulator: a trace replayed on many workers in virtual time, by the
//! production code. Each worker is the real `sched::Scheduler` (queue, step planner, KV
//! blocks and prefix cache, admission) whose steps take what its [`StepProfile`] says;
//! requests are placed by the real `sched::route::Router`. This file is only the driver:
//! a discrete-event loop (arrivals, step ends) on a virtual clock — no policy of its own,
//! no wall clock, no randomness beyond the seed.

use crate::profile::StepProfile;
use crate::trace::TraceRequest;
use crate::worker::{Life, Worker};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokenfab_engine::{EngineConfig, ExecutorCapacity};
use tokenfab_sched::route::{Policy, RouteRequest, Router, WorkerLoad};
use tokenfab_sched::{SchedRequest, Scheduler, Slo};
use tokenfab_types::{Nanos, RequestId, TenantId, Tokens};

/// One simulated worker: an accelerator running one model.
#[derive(Clone, Debug, PartialEq)]
pub struct SimWorker {
    /// What it is, e.g. `h100:llama3-8b` (for reports).
    pub kind: String,
    pub profile: StepProfile,
    pub kv_tokens: u64,
    pub slots: u32,
    pub usd_per_hour: f64,
    /// See `ExecutorCapacity::fast_prefill_rows`.
    pub fast_prefill_rows: u32,
    /// See `Accelerator::step_noise`.
    pub step_noise: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub workers: Vec<SimWorker>,
    pub policy: Policy,
    /// The engine settings every worker runs with (as `tokenfab worker` would).
    pub engine: EngineConfig,
    /// The SLO goodput is judged against.
    pub slo: Slo,
    /// Whether the router and the engines see the SLO and turn away requests predicted to
    /// miss it (tokenfab's admission). Off, they schedule every request as engines and
    /// routers without SLO admission (vLLM, SGLang behind a load balancer) do, and the
    /// report still judges goodput against `slo`.
    pub slo_admission: bool,
    pub seed: u64,
}

/// Percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Pcts {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// P50/P90/P99 of `xs` (nearest rank), rounded to µs.
pub fn pcts(mut xs: Vec<f64>) -> Pcts {
    if xs.is_empty() {
        return Pcts::default();
    }
    xs.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let k = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
        (xs[k.min(xs.len() - 1)] * 1000.0).round() / 1000.0
    };
    Pcts {
        p50: at(50.0),
        p90: at(90.0),
        p99: at(99.0),
    }
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Report {
    pub policy: String,
    /// Whether SLO admission was on ([`SimConfig::slo_admission`]).
    pub slo_admission: bool,
    pub workers: usize,
    pub requests: usize,
    pub completed: usize,
    pub rejected: usize,
    pub ttft_ms: Pcts,
    /// Time per output token after the first.
    pub tpot_ms: Pcts,
    pub e2e_ms: Pcts,
    /// Completed requests that met every SLO given, per second of the run.
    pub goodput_rps: f64,
    /// Fraction of completed requests meeting the SLO (1.0 without one).
    pub slo_attainment: f64,
    pub output_tok_per_s: f64,
    pub prefix_hit_rate: f64,
    pub preemptions: u64,
    /// Accelerator cost of the run per million output tokens.
    pub usd_per_m_output_tokens: f64,
    pub makespan_s: f64,
    /// Requests per worker (load balance).
    pub per_worker: Vec<u64>,
    /// Jain's index of requests per worker: 1 = perfectly even, 1/n = all on one.
    pub jain_workers: f64,
    /// Time from arrival to the first step that works on the request, by band.
    pub queue_ms_by_band: BTreeMap<String, Pcts>,
    /// Per tenant (traces without tenants have one, 0).
    pub tenants: Vec<TenantStats>,
    /// Jain's index of the tenants' mean TTFT: 1 = every tenant waits as long as the
    /// others, lower = some tenants wait longer (a noisy neighbour).
    pub jain_tenant_ttft: f64,
    /// Discrete events processed (arrivals and steps).
    pub events: u64,
    /// Load over time, for plots (not in the JSON report).
    #[serde(skip)]
    pub timeline: Vec<TimePoint>,
    /// Every completed request's TTFT (ms), for CDF plots (not in the JSON report).
    #[serde(skip)]
    pub ttfts: Vec<f64>,
}

impl Report {
    /// The report's name in tables and plots: the policy, marked when SLO admission
    /// was off.
    pub fn label(&self) -> String {
        if self.slo_admission {
            self.policy.clone()
        } else {
            format!("{} (no adm.)", self.policy)
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TenantStats {
    pub tenant: u32,
    pub requests: usize,
    pub completed: usize,
    pub ttft_ms: Pcts,
    pub queue_ms: Pcts,
    pub output_tokens: u64,
}

/// The cluster at one instant.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TimePoint {
    pub t_s: f64,
    /// Requests arrived and not yet ended.
    pub in_flight: u64,
    /// Output tokens per second over the interval ending here.
    pub output_tok_per_s: f64,
}

/// Replay `trace` on the cluster of `cfg`.
///
/// Every worker sees the same events in the same order as in one global event loop (at
/// equal times an arrival comes before a step's end), so the report does not depend on
/// threads. Workers are independent between arrivals: a second thread keeps them up with
/// the clock — every step ending before the arrival being routed — while this one routes,
/// bringing each worker the router reads (its sample, or everyone) the rest of the way.
pub fn simulate(trace: &[TraceRequest], cfg: &SimConfig) -> Report {
    // Where the router reads every worker at each arrival, this thread brings them all
    // up to it and a helper would only contend.
    let helper = Router::new(cfg.policy, 1, 1).samples(cfg.workers.len())
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    replay(trace, cfg, helper)
}

/// [`simulate`], with or without the helper thread.
fn replay(trace: &[TraceRequest], cfg: &SimConfig, helper: bool) -> Report {
    let block_tokens = cfg.engine.block_tokens.max(1);
    let cells: Vec<Mutex<Cell>> = cfg
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let cap = ExecutorCapacity {
                slots: w.slots,
                kv_tokens: w.kv_tokens,
                max_seq_tokens: w.kv_tokens,
                max_batch_tokens: cfg.engine.max_step_tokens,
                stream_per_slot: false,
                fast_prefill_rows: w.fast_prefill_rows,
            };
            Mutex::new(Cell {
                worker: Worker::new(
                    Scheduler::new(cfg.engine.sched_config(&cap)),
                    cfg.seed ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93),
                ),
                load: WorkerLoad {
                    id: i as u64,
                    prefill_ns_per_token: w.profile.per_token.0.max(1),
                    decode_ns_per_seq: w.profile.per_seq.0 + w.profile.per_token.0,
                    price_nano_usd_per_hour: (w.usd_per_hour * 1e9) as u64,
                    // As a worker reports it on /health; 1 = known, (nearly) empty.
                    kv_permille: 1,
                    ..WorkerLoad::default()
                },
            })
        })
        .collect();
    // What the router sees of each worker: copied from a worker when the router is
    // about to read it.
    let mut loads: Vec<WorkerLoad> = cells.iter().map(|c| lock(c).load.clone()).collect();
    // The router's estimate of a worker's prefix cache holds no more than the largest
    // worker's KV could (it ages out the oldest blocks beyond that, as eviction would).
    let kv_blocks =
        cfg.workers.iter().map(|w| w.kv_tokens).max().unwrap_or(0) / u64::from(block_tokens);
    let mut router = Router::new(cfg.policy, kv_blocks as usize, u64::from(block_tokens));
    let mut lives = vec![Life::default(); trace.len()];
    // Arrivals in time order (a stable sort, for traces that are not sorted).
    let mut arrivals: Vec<usize> = (0..trace.len()).collect();
    arrivals.sort_by_key(|&i| trace[i].arrival);
    let tenants: Vec<TenantId> = (0..=trace.iter().map(|r| r.tenant).max().unwrap_or(0))
        .map(|t| TenantId(format!("t{t}")))
        .collect();
    // What the router and the engines are told; goodput is judged against `cfg.slo`.
    let admission_slo = if cfg.slo_admission {
        cfg.slo
    } else {
        Slo::default()
    };
    let clock = Clock {
        frontier: AtomicU64::new(0),
        finished: AtomicBool::new(false),
        due: Mutex::new(BinaryHeap::new()),
    };
    std::thread::scope(|s| {
        if helper {
            s.spawn(|| clock.keep_up(&cells, cfg, trace));
        }
        let finish = Finish(&clock);
        for &i in &arrivals {
            let r = &trace[i];
            let now = r.arrival;
            clock.frontier.store(now.0, Ordering::Release);
            let blocks = block_hashes(r, i, cfg.seed, block_tokens);
            let route = RouteRequest {
                blocks: &blocks,
                prompt_tokens: r.input_tokens,
                max_tokens: r.output_tokens.max(1),
                session: None,
                ttft_slo: admission_slo.ttft,
            };
            let sample = router.sample(&route, &loads);
            // The router reads its sample, or (`None`) every worker.
            let everyone = if sample.is_some() {
                0..0
            } else {
                0..cells.len()
            };
            for w in everyone.chain(sample.iter().flatten().copied()) {
                let c = clock.advance(&cells[w], w, now, cfg, trace);
                loads[w].clone_from(&c.load);
            }
            let Some(d) = router.route_within(&route, &loads, sample) else {
                lives[i].rejected = true;
                continue;
            };
            router.record_sent(loads[d.chosen].id, &blocks);
            let w = d.chosen;
            let uncached = d
                .chosen_score()
                .map_or(r.input_tokens, |s| s.uncached_tokens);
            let req = SchedRequest {
                id: RequestId(i as u64 + 1),
                tenant: tenants[r.tenant as usize].clone(),
                band: r.band,
                weight: 1,
                prompt: Tokens(r.input_tokens.max(1)),
                max_new: Tokens(r.output_tokens.max(1)),
                arrival: now,
                slo: admission_slo,
                block_hashes: blocks,
            };
            lives[i].worker = w;
            let mut c = lock(&cells[w]);
            let c = &mut *c;
            if !c.worker.admit(now, req, uncached, &mut c.load, trace) {
                lives[i].rejected = true;
            }
            let before = c.worker.done_at;
            c.worker.kick(now, &cfg.workers[w]);
            clock.moved(w, before, c.worker.done_at);
            loads[w].clone_from(&c.load);
        }
        // Every step to the end, then the helper (if any) stops.
        drop(finish);
        if !helper {
            clock.keep_up(&cells, cfg, trace);
        }
    });
    let workers: Vec<Worker> = cells
        .into_iter()
        .map(|c| {
            c.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .worker
        })
        .collect();
    let mut now = arrivals.last().map_or(Nanos(0), |&i| trace[i].arrival);
    for wk in &workers {
        now = now.max(wk.last);
        for (i, l) in wk.lives() {
            lives[i] = Life {
                worker: lives[i].worker,
                rejected: lives[i].rejected || l.rejected,
                ..*l
            };
        }
    }
    let mut r = report(trace, cfg, &lives, &workers, now);
    r.events = trace.len() as u64 + workers.iter().map(|w| w.steps).sum::<u64>();
    r
}

/// A worker and its load as the router would read it.
struct Cell {
    worker: Worker,
    load: WorkerLoad,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How far the workers may go, and when their steps under way end.
struct Clock {
    /// Nanoseconds: steps ending before it may be completed (every arrival before it has
    /// been admitted).
    frontier: AtomicU64,
    /// No arrival is left.
    finished: AtomicBool,
    /// (end of a worker's step under way, worker). An entry is current while it equals
    /// the worker's `done_at`; others are stale and skipped.
    due: Mutex<BinaryHeap<Reverse<(Nanos, usize)>>>,
}

/// Lets the helper finish and stop when dropped, also when the routing thread unwinds
/// (the scope would otherwise wait for it forever).
struct Finish<'a>(&'a Clock);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.frontier.store(u64::MAX, Ordering::Release);
        self.0.finished.store(true, Ordering::Release);
    }
}

impl Clock {
    /// A worker's step end moved from `before` to `after`.
    fn moved(&self, w: usize, before: Option<Nanos>, after: Option<Nanos>) {
        if let Some(t) = after.filter(|_| after != before) {
            lock(&self.due).push(Reverse((t, w)));
        }
    }

    /// Bring worker `w` up to `until` (every step ending before it completed).
    fn advance<'a>(
        &self,
        cell: &'a Mutex<Cell>,
        w: usize,
        until: Nanos,
        cfg: &SimConfig,
        trace: &[TraceRequest],
    ) -> MutexGuard<'a, Cell> {
        let mut c = lock(cell);
        let Cell { worker, load } = &mut *c;
        let before = worker.done_at;
        worker.advance(until, &cfg.workers[w], load, trace);
        self.moved(w, before, worker.done_at);
        c
    }

    /// Complete the earliest due steps up to the frontier, until the run is finished and
    /// nothing is due. Spins while nothing is due: the simulation owns the machine.
    fn keep_up(&self, cells: &[Mutex<Cell>], cfg: &SimConfig, trace: &[TraceRequest]) {
        let mut idle = 0u32;
        loop {
            let finished = self.finished.load(Ordering::Acquire);
            let frontier = Nanos(self.frontier.load(Ordering::Acquire));
            let next = {
                let mut due = lock(&self.due);
                match due.peek() {
                    Some(&Reverse((t, w))) if t < frontier => {
                        due.pop();
                        Some(w)
                    }
                    Some(_) => None,
                    None if finished => return,
                    None => None,
                }
            };
            let Some(w) = next else {
                idle += 1;
                if idle < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            };
            idle = 0;
            // A stale entry (the worker was brought up meanwhile) costs a no-op.
            drop(self.advance(&cells[w], w, frontier, cfg, trace));
        }
    }
}

/// Chain hashes of a request's prompt blocks (`block` tokens each, full blocks only), as
/// the engine's prefix index would compute them from the tokens: each trace block id
/// stands for fixed content, so requests sharing leading block ids share those hashes;
/// tokens past the trace's blocks are the request's own. Built from ids directly, without
/// materialising tokens (a Mooncake prompt is ~15k of them).
fn block_hashes(r: &TraceRequest, i: usize, seed: u64, block: u32) -> Vec<u64> {
    let block = u64::from(block.max(1));
    let own = seed ^ ((i as u64) << 20) ^ 0xa5a5_a5a5;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    (0..r.input_tokens.max(1) / block)
        .map(|j| {
            // The trace block holding this block's last token (with the chain, that
            // fixes everything before it too).
            let last = (j + 1) * block - 1;
            let src = usize::try_from(last / r.block_tokens.max(1))
                .ok()
                .and_then(|k| r.blocks.get(k));
            let id = src.map_or(own, |b| b ^ 0x5bd1_e995);
            h = mix(h ^ id, j);
            h
        })
        .collect()
}

fn mix(a: u64, b: u64) -> u64 {
    let mut h = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 32)
}

fn report(
    trace: &[TraceRequest],
    cfg: &SimConfig,
    lives: &[Life],
    workers: &[Worker],
    end: Nanos,
) -> Report {
    let ms = |a: Nanos, b: Nanos| (b.0.saturating_sub(a.0)) as f64 / 1e6;
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let mut good = 0usize;
    let mut out_tokens = 0u64;
    for (r, l) in trace.iter().zip(lives) {
        let (Some(first), Some(done)) = (l.first, l.end) else {
            continue;
        };
        let t = ms(r.arrival, first);
        // A one-token answer has no time per output token (as `bench` counts it).
        let per = if l.tokens > 1 {
            let per = ms(first, done) / (l.tokens - 1) as f64;
            tpot.push(per);
            per
        } else {
            0.0
        };
        ttft.push(t);
        e2e.push(ms(r.arrival, done));
        out_tokens += l.tokens;
        let ok_ttft = cfg.slo.ttft.is_none_or(|s| t <= s.0 as f64 / 1e6);
        let ok_tpot = cfg.slo.tpot.is_none_or(|s| per <= s.0 as f64 / 1e6);
        good += usize::from(ok_ttft && ok_tpot);
    }
    let completed = ttft.len();
    let ttft_all = ttft.clone();
    let secs = (end.0 as f64 / 1e9).max(1e-9);
    let (hits, queries, preemptions) = workers.iter().fold((0, 0, 0), |a, w| {
        let s = w.sched.stats();
        (
            a.0 + s.prefix_hit_tokens,
            a.1 + s.prefix_query_tokens,
            a.2 + s.preemptions,
        )
    });
    let usd_per_s: f64 = cfg.workers.iter().map(|w| w.usd_per_hour / 3600.0).sum();
    let mut queue_by_band: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let n_tenants = trace
        .iter()
        .map(|r| r.tenant as usize + 1)
        .max()
        .unwrap_or(1);
    let mut per_tenant: Vec<(usize, Vec<f64>, Vec<f64>, u64)> =
        vec![(0, Vec::new(), Vec::new(), 0); n_tenants];
    for (r, l) in trace.iter().zip(lives) {
        let t = &mut per_tenant[r.tenant as usize];
        t.0 += 1;
        if let Some(s) = l.started {
            let q = ms(r.arrival, s);
            queue_by_band
                .entry(r.band.as_str().to_owned())
                .or_default()
                .push(q);
            t.2.push(q);
        }
        if let (Some(first), Some(_)) = (l.first, l.end) {
            t.1.push(ms(r.arrival, first));
            t.3 += l.tokens;
        }
    }
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let tenant_ttft: Vec<f64> = per_tenant
        .iter()
        .filter(|t| !t.1.is_empty())
        .map(|t| mean(&t.1))
        .collect();
    let per_worker: Vec<u64> = workers.iter().map(|w| w.served).collect();
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    Report {
        policy: cfg.policy.as_str().to_owned(),
        slo_admission: cfg.slo_admission,
        workers: cfg.workers.len(),
        requests: trace.len(),
        completed,
        rejected: lives.iter().filter(|l| l.rejected).count(),
        ttft_ms: pcts(ttft),
        tpot_ms: pcts(tpot),
        e2e_ms: pcts(e2e),
        goodput_rps: round(good as f64 / secs, 3),
        slo_attainment: round(good as f64 / completed.max(1) as f64, 4),
        output_tok_per_s: round(out_tokens as f64 / secs, 1),
        prefix_hit_rate: round(hits as f64 / queries.max(1) as f64, 4),
        preemptions,
        usd_per_m_output_tokens: round(usd_per_s * secs / (out_tokens.max(1) as f64 / 1e6), 4),
        makespan_s: round(secs, 3),
        jain_workers: round(jain(per_worker.iter().map(|&n| n as f64)), 4),
        per_worker,
        queue_ms_by_band: queue_by_band
            .into_iter()
            .map(|(b, xs)| (b, pcts(xs)))
            .collect(),
        jain_tenant_ttft: round(jain(tenant_ttft.iter().copied()), 4),
        tenants: per_tenant
            .into_iter()
            .enumerate()
            .map(|(i, (requests, ttft, queue, tokens))| TenantStats {
                tenant: i as u32,
                requests,
                completed: ttft.len(),
                ttft_ms: pcts(ttft),
                queue_ms: pcts(queue),
                output_tokens: tokens,
            })
            .collect(),
        events: 0,
        timeline: timeline(trace, lives, end),
        ttfts: ttft_all,
    }
}

/// Jain's fairness index (Σx)² / (n·Σx²): 1 when all are equal.
fn jain(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut n, mut sum, mut sq) = (0.0, 0.0, 0.0);
    for x in xs {
        n += 1.0;
        sum += x;
        sq += x * x;
    }
    if sq == 0.0 {
        1.0
    } else {
        sum * sum / (n * sq)
    }
}

/// In-flight requests and output rate at 200 instants over the run.
fn timeline(trace: &[TraceRequest], lives: &[Life], end: Nanos) -> Vec<TimePoint> {
    const POINTS: usize = 200;
    let span = end.0.max(1);
    let at = |k: usize| span * k as u64 / POINTS as u64;
    let bucket = |t: Nanos| ((t.0 as u128 * POINTS as u128 / span as u128) as usize).min(POINTS);
    // +1 at arrival, -1 at the end; tokens spread over first..end.
    let mut delta = vec![0i64; POINTS + 2];
    let mut tokens = vec![0.0f64; POINTS + 1];
    for (r, l) in trace.iter().zip(lives) {
        delta[bucket(r.arrival)] += 1;
        let stop = l.end.map_or(POINTS + 1, bucket);
        delta[stop] -= 1;
        if let (Some(first), Some(done)) = (l.first, l.end) {
            let (a, b) = (bucket(first), bucket(done));
            let per = l.tokens as f64 / (b - a + 1) as f64;
            for t in &mut tokens[a..=b] {
                *t += per;
            }
        }
    }
    let width = span as f64 / 1e9 / POINTS as f64;
    let mut in_flight = 0i64;
    (0..=POINTS)
        .map(|k| {
            in_flight += delta[k];
            TimePoint {
                t_s: at(k) as f64 / 1e9,
                in_flight: in_flight.max(0) as u64,
                output_tok_per_s: tokens[k] / width,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfab_sched::Band;

    fn trace() -> Vec<TraceRequest> {
        // 3 prompt groups (so round-robin over 4 workers mixes them), 40 requests 20 ms
        // apart, sharing 3 of 4 blocks within a group.
        (0..40u64)
            .map(|i| TraceRequest {
                arrival: Nanos::from_millis(i * 20),
                input_tokens: 2048,
                output_tokens: 16,
                blocks: vec![i % 3 * 100, i % 3 * 100 + 1, i % 3 * 100 + 2, 10_000 + i],
                block_tokens: 512,
                tenant: 0,
                band: Band::Standard,
            })
            .collect()
    }

    fn config(policy: Policy) -> SimConfig {
        let worker = SimWorker {
            kind: "test".into(),
            profile: StepProfile {
                base: Nanos::from_millis(5),
                per_token: Nanos(50_000),
                per_seq: Nanos(100_000),
                per_kv_ps: 0,
                per_prefill_kv_ps: 0,
            },
            kv_tokens: 65_536,
            slots: 64,
            usd_per_hour: 2.0,
            fast_prefill_rows: 1,
            step_noise: 0.0,
        };
        SimConfig {
            workers: vec![worker; 4],
            policy,
            engine: EngineConfig::default(),
            slo: Slo::default(),
            slo_admission: true,
            seed: 7,
        }
    }

    #[test]
    fn every_request_ends_and_the_report_is_reproducible() {
        let a = simulate(&trace(), &config(Policy::PrefixLoad));
        assert_eq!(a.completed, 40, "{a:?}");
        assert_eq!(a.rejected, 0);
        assert_eq!(a.per_worker.iter().sum::<u64>(), 40);
        let b = simulate(&trace(), &config(Policy::PrefixLoad));
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            serde_json::to_string(&b).expect("json"),
            "same trace, same seed: the same report"
        );
    }

    #[test]
    fn the_helper_thread_changes_no_byte_of_the_report() {
        // 100 workers: prefix-load and round-robin read a sample, dynamo-kv everyone.
        // 400 requests 1 ms apart, so steps end between arrivals on many workers.
        let t: Vec<TraceRequest> = (0..400u64)
            .map(|i| TraceRequest {
                arrival: Nanos::from_millis(i),
                input_tokens: 256 + i % 7 * 64,
                output_tokens: 8 + i % 5 * 8,
                blocks: vec![i % 9 * 100, i % 9 * 100 + 1, 10_000 + i],
                block_tokens: 128,
                tenant: (i % 3) as u32,
                band: Band::Standard,
            })
            .collect();
        let json = |r: &Report| serde_json::to_string(r).expect("json");
        for policy in [Policy::PrefixLoad, Policy::RoundRobin, Policy::DynamoKv] {
            // With step-time noise too: each step's draw is keyed by worker and step.
            for noise in [0.0, 0.1] {
                let mut cfg = config(policy);
                cfg.workers[0].step_noise = noise;
                cfg.workers = vec![cfg.workers[0].clone(); 100];
                let alone = replay(&t, &cfg, false);
                assert_eq!(alone.completed, 400, "{policy:?}");
                for _ in 0..3 {
                    assert_eq!(json(&replay(&t, &cfg, true)), json(&alone), "{policy:?}");
                }
            }
        }
        // The noise is drawn: another seed, another report.
        let mut cfg = config(Policy::RoundRobin);
        cfg.workers[0].step_noise = 0.1;
        let a = replay(&t, &cfg, false);
        cfg.seed += 1;
        assert_ne!(a.e2e_ms, replay(&t, &cfg, false).e2e_ms);
    }

    #[test]
    fn tenants_and_bands_are_reported_and_a_flood_shows_in_jain() {
        let mut t = trace();
        for (i, r) in t.iter_mut().enumerate() {
            // Tenant 0 sends 3 of every 4 requests, in the batch band.
            (r.tenant, r.band) = if i % 4 == 3 {
                (1, Band::Interactive)
            } else {
                (0, Band::Batch)
            };
        }
        let r = simulate(&t, &config(Policy::PrefixLoad));
        assert_eq!(r.tenants.len(), 2);
        assert_eq!(r.tenants[0].requests + r.tenants[1].requests, 40);
        assert_eq!(r.tenants[1].requests, 10);
        let bands: Vec<&str> = r.queue_ms_by_band.keys().map(String::as_str).collect();
        assert_eq!(bands, ["batch", "interactive"]);
        assert!(r.jain_tenant_ttft > 0.5 && r.jain_tenant_ttft <= 1.0);
        assert!(r.jain_workers > 0.25 && r.jain_workers <= 1.0);
        assert_eq!(r.timeline.len(), 201);
        assert_eq!(r.ttfts.len(), r.completed);
    }

    #[test]
    fn prefix_aware_routing_hits_the_cache_more_than_round_robin() {
        let pl = simulate(&trace(), &config(Policy::PrefixLoad));
        let rr = simulate(&trace(), &config(Policy::RoundRobin));
        assert!(
            pl.prefix_hit_rate > rr.prefix_hit_rate,
            "prefix-load {} vs round-robin {}",
            pl.prefix_hit_rate,
            rr.prefix_hit_rate
        );
        assert!(pl.ttft_ms.p50 <= rr.ttft_ms.p50, "{pl:?} {rr:?}");
    }

    #[test]
    fn without_slo_admission_nothing_is_refused_and_goodput_is_still_judged() {
        // One worker, arrivals 2 ms apart, each needing ~100 ms of prefill: a queue
        // builds, and a 150 ms TTFT target cannot hold for most requests.
        let mut t = trace();
        for (i, r) in t.iter_mut().enumerate() {
            r.arrival = Nanos::from_millis(i as u64 * 2);
        }
        let mut cfg = config(Policy::RoundRobin);
        cfg.workers.truncate(1);
        cfg.slo.ttft = Some(Nanos::from_millis(150));
        let on = simulate(&t, &cfg);
        cfg.slo_admission = false;
        let off = simulate(&t, &cfg);
        assert!(on.rejected > 0, "admission turns some away: {on:?}");
        assert!(on.slo_admission && !off.slo_admission);
        assert_eq!(off.rejected, 0, "{off:?}");
        assert_eq!(off.completed, 40);
        assert!(
            off.slo_attainment < 0.5,
            "the SLO is still judged: {}",
            off.slo_attainment
        );
    }
}
