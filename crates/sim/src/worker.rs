//! One simulated worker: the real `sched::Scheduler`, the step under way, and the lives
//! of the requests it holds. A worker touches nothing outside itself, so it catches up
//! with the virtual clock only when something reads it — the router consulting its load,
//! an arrival, the end of the run — and workers nobody reads advance in parallel
//! (`cluster.rs`).

use crate::cluster::SimWorker;
use crate::profile::{jitter, StepShape};
use crate::trace::TraceRequest;
use rustc_hash::FxHashMap;
use tokenfab_sched::route::WorkerLoad;
use tokenfab_sched::{Ended, SchedRequest, Scheduler, StepResult, Work};
use tokenfab_types::{Nanos, RequestId};

/// A request's life as seen from outside.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Life {
    pub worker: usize,
    /// The first step that worked on it.
    pub started: Option<Nanos>,
    pub first: Option<Nanos>,
    pub end: Option<Nanos>,
    pub tokens: u64,
    pub rejected: bool,
    pub uncached: u64,
}

pub(crate) struct Worker {
    pub sched: Scheduler,
    /// Its running requests still waiting for their first token, with their uncached
    /// prompt tokens: a few entries, so a step's tokens need not touch each `Life`.
    awaiting: Vec<(RequestId, u64)>,
    /// When the step under way ends; `None` while idle.
    pub done_at: Option<Nanos>,
    /// The work of the step under way.
    work: Vec<Work>,
    step_time: Nanos,
    pub served: u64,
    /// Requests admitted here and not ended yet, by trace index.
    lives: FxHashMap<usize, Life>,
    /// Requests that ended here, by trace index.
    pub ended: Vec<(usize, Life)>,
    /// Steps completed.
    pub steps: u64,
    /// When the last of them ended.
    pub last: Nanos,
    /// Draws this worker's step-time noise (from the run's seed).
    noise_key: u64,
}

/// A request's trace index.
fn index(id: RequestId) -> usize {
    (id.0 - 1) as usize
}

impl Worker {
    pub fn new(sched: Scheduler, noise_key: u64) -> Worker {
        Worker {
            sched,
            awaiting: Vec::new(),
            done_at: None,
            work: Vec::new(),
            step_time: Nanos(0),
            served: 0,
            lives: FxHashMap::default(),
            ended: Vec::new(),
            steps: 0,
            last: Nanos(0),
            noise_key,
        }
    }

    /// Every request's life, ended or not.
    pub fn lives(&self) -> impl Iterator<Item = (usize, &Life)> {
        (self.ended.iter().map(|(i, l)| (*i, l))).chain(self.lives.iter().map(|(i, l)| (*i, l)))
    }

    /// Offer the scheduler request `req` (trace index `i`) at `now`; the worker must have
    /// caught up to `now`. Whether it was admitted.
    pub fn admit(
        &mut self,
        now: Nanos,
        req: SchedRequest,
        uncached: u64,
        load: &mut WorkerLoad,
        trace: &[TraceRequest],
    ) -> bool {
        let i = index(req.id);
        match self.sched.admit(now, req) {
            Ok(shed) => {
                load.outstanding_requests += 1;
                load.queued_prefill_tokens += uncached;
                load.outstanding_decode_tokens += trace[i].output_tokens.max(1);
                self.lives.insert(
                    i,
                    Life {
                        uncached,
                        ..Life::default()
                    },
                );
                self.served += 1;
                for e in shed {
                    self.end(load, e, now, trace);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Complete every step that ends before `until`, starting the next ones as a real
    /// engine loop would.
    pub fn advance(
        &mut self,
        until: Nanos,
        kind: &SimWorker,
        load: &mut WorkerLoad,
        trace: &[TraceRequest],
    ) {
        while let Some(now) = self.done_at.filter(|&t| t < until) {
            self.done_at = None;
            self.step_done(now, load, trace);
            self.kick(now, kind);
        }
    }

    fn step_done(&mut self, now: Nanos, load: &mut WorkerLoad, trace: &[TraceRequest]) {
        self.steps += 1;
        self.last = now;
        let work = std::mem::take(&mut self.work);
        let mut result = StepResult {
            sampled: Vec::with_capacity(work.len()),
            elapsed: self.step_time,
        };
        for x in work.iter().filter(|x| x.sample) {
            // Timing-model tokens never end a generation; the length limit does.
            result.sampled.push((x.id, false));
            if let Some(k) = self.awaiting.iter().position(|(id, _)| *id == x.id) {
                let (_, uncached) = self.awaiting.swap_remove(k);
                if let Some(life) = self.lives.get_mut(&index(x.id)) {
                    life.first = Some(now);
                }
                load.queued_prefill_tokens = load.queued_prefill_tokens.saturating_sub(uncached);
            }
            load.outstanding_decode_tokens = load.outstanding_decode_tokens.saturating_sub(1);
        }
        for e in self.sched.complete(now, &result) {
            self.end(load, e, now, trace);
        }
        // As the worker reports it on /health (at least 1: known).
        let b = self.sched.blocks();
        load.kv_permille =
            (u64::from(b.used_count()) * 1000 / u64::from(b.total().max(1))).max(1) as u32;
    }

    /// When idle, plan the next step at `now`; it ends at `done_at`.
    pub fn kick(&mut self, now: Nanos, kind: &SimWorker) {
        if self.done_at.is_some() {
            return;
        }
        // A plan may only release or trim (finished sequences, evictions): plan again.
        for _ in 0..8 {
            let plan = self.sched.plan(now);
            if !plan.work.is_empty() {
                // Sequences join the batch only with work in the same step.
                for (id, _) in &plan.start {
                    if let Some(life) = self.lives.get_mut(&index(*id)) {
                        life.started.get_or_insert(now);
                        if life.first.is_none() && !self.awaiting.iter().any(|a| a.0 == *id) {
                            self.awaiting.push((*id, life.uncached));
                        }
                    }
                }
                let shape = StepShape::of(
                    kind.fast_prefill_rows,
                    plan.work.iter().map(|w| (w.pos, u64::from(w.n))),
                );
                let t = jitter(
                    kind.profile.step_time(&shape),
                    kind.step_noise,
                    self.noise_key,
                    self.steps,
                );
                self.step_time = t;
                self.work = plan.work;
                self.done_at = Some(Nanos(now.0 + t.0.max(1)));
                return;
            }
            if plan.is_empty() {
                return;
            }
        }
    }

    fn end(&mut self, l: &mut WorkerLoad, e: Ended, now: Nanos, trace: &[TraceRequest]) {
        let i = index(e.id());
        self.awaiting.retain(|a| a.0 != e.id());
        let mut life = self.lives.remove(&i).unwrap_or_default();
        match e {
            Ended::Finished { generated, .. } => {
                life.end = Some(now);
                life.tokens = generated.0;
            }
            Ended::Shed { generated, .. } => {
                life.rejected = true;
                life.tokens = generated.0;
            }
        }
        l.outstanding_requests = l.outstanding_requests.saturating_sub(1);
        if life.first.is_none() {
            l.queued_prefill_tokens = l.queued_prefill_tokens.saturating_sub(life.uncached);
        }
        let left = trace[i].output_tokens.max(1).saturating_sub(life.tokens);
        l.outstanding_decode_tokens = l.outstanding_decode_tokens.saturating_sub(left);
        self.ended.push((i, life));
    }
}
