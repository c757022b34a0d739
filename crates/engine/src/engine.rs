//! The engine thread: intake → cancellations → plan → execute → stream → complete.

use crate::executor::{BatchEntry, Executor, ExecutorCapacity, SamplingParams};
use crate::metrics::EngineMetrics;
use crate::request::{Event, GenerateRequest, Generation, Usage};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenfab_sched::{
    prefix_hashes, Ended, FinishReason, KvQuota, Rejection, SchedConfig, SchedRequest,
    SchedSnapshot, Scheduler, StepResult,
};
use tokenfab_types::{Band, ErrorCode, Nanos, RequestId, TenantId, TokenId, Tokens};
use tokio::sync::mpsc;

/// Engine tuning that is not derived from the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Token budget of one step (decodes + prefill chunks).
    pub max_step_tokens: u32,
    /// Largest prefill chunk of one sequence per step.
    pub max_prefill_chunk: u32,
    /// Sequences in the running batch at most (the executor's other slots hold
    /// prefix-cache entries).
    pub max_running: u32,
    pub block_tokens: u32,
    pub max_waiting: u32,
    pub max_waiting_tokens: u64,
    /// Step time to keep while sequences decode (their inter-token latency); prefill
    /// chunks are sized from measured step times to fit. 0 = no target.
    pub target_step_ms: u32,
    /// How long to wait for arrivals before a step that would only prefill prompts
    /// already running, right after a step which ended requests
    /// (`Scheduler::next_step_follows_ends`); 0 = plan at once.
    pub linger_ms: u32,
    /// Named tenants' shares of the KV cache.
    pub kv_shares: BTreeMap<TenantId, KvShare>,
    /// A quiet tenant's short request gets steps of its own until its first token
    /// (`SchedConfig::isolate_quiet_starts`).
    pub isolate_quiet_starts: bool,
}

/// A tenant's share of the KV cache, per mille of its blocks: a cap and a floor (see
/// `tokenfab_sched::KvQuota`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvShare {
    pub max_permille: Option<u32>,
    pub min_permille: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_step_tokens: 512,
            max_prefill_chunk: 512,
            max_running: 16,
            block_tokens: 16,
            max_waiting: 256,
            max_waiting_tokens: 1 << 20,
            target_step_ms: 250,
            linger_ms: 3,
            kv_shares: BTreeMap::new(),
            isolate_quiet_starts: true,
        }
    }
}

impl EngineConfig {
    /// The scheduler's configuration for an executor of `cap` (the simulator builds its
    /// workers' schedulers the same way).
    pub fn sched_config(&self, cap: &ExecutorCapacity) -> SchedConfig {
        let block_tokens = self.block_tokens.max(1);
        let kv_blocks = (cap.kv_tokens / u64::from(block_tokens)) as u32;
        let of =
            |permille: u32| (u64::from(kv_blocks) * u64::from(permille.min(1000)) / 1000) as u32;
        SchedConfig {
            slots: cap.slots,
            max_running: self.max_running.clamp(1, cap.slots),
            kv_blocks,
            block_tokens,
            max_seq_tokens: cap.max_seq_tokens,
            max_step_tokens: self.max_step_tokens.min(cap.max_batch_tokens),
            max_prefill_chunk: self.max_prefill_chunk.min(cap.max_batch_tokens),
            max_waiting: self.max_waiting,
            max_waiting_tokens: self.max_waiting_tokens,
            watermark_blocks: 4,
            target_step: (self.target_step_ms > 0)
                .then(|| Nanos::from_millis(u64::from(self.target_step_ms))),
            kv_quotas: self
                .kv_shares
                .iter()
                .map(|(t, s)| {
                    let quota = KvQuota {
                        max_blocks: s.max_permille.map(of),
                        min_blocks: of(s.min_permille),
                    };
                    (t.clone(), quota)
                })
                .collect(),
            adopt_cached_slots: cap.stream_per_slot,
            min_prefill_piece: cap.fast_prefill_rows.clamp(1, cap.max_batch_tokens.max(1)),
            isolate_quiet_starts: self.isolate_quiet_starts,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}", rejection_message(.0))]
    Rejected(Rejection),
    #[error("inference failed: {0}")]
    Exec(String),
    #[error("the engine is not running")]
    Stopped,
}

fn rejection_message(r: &Rejection) -> String {
    match r {
        Rejection::TooLong { limit, requested } => format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens \
             (prompt + max_tokens). Please reduce the length of the messages or max_tokens.",
            limit.0, requested.0
        ),
        Rejection::OverKvQuota { limit, prompt } => format!(
            "Your organization's share of this server's KV cache holds at most {} tokens per \
             sequence, and the prompt has {}. Shorten the prompt.",
            limit.0, prompt.0
        ),
        Rejection::EmptyPrompt => "The prompt is empty.".to_owned(),
        Rejection::QueueFull { .. } => "The server is at capacity; retry later.".to_owned(),
        Rejection::SloUnattainable { predicted_ttft, .. } => format!(
            "The requested time-to-first-token target cannot be met (predicted {} ms); retry later.",
            predicted_ttft.as_millis()
        ),
        Rejection::Draining => "The server is shutting down.".to_owned(),
    }
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Rejected(Rejection::TooLong { .. } | Rejection::OverKvQuota { .. }) => {
                ErrorCode::ContextLengthExceeded
            }
            EngineError::Rejected(Rejection::EmptyPrompt) => ErrorCode::InvalidRequest,
            EngineError::Rejected(
                Rejection::QueueFull { .. } | Rejection::SloUnattainable { .. },
            ) => ErrorCode::Overloaded,
            EngineError::Rejected(Rejection::Draining) | EngineError::Stopped => {
                ErrorCode::ShuttingDown
            }
            EngineError::Exec(_) => ErrorCode::Internal,
        }
    }

    /// Seconds a client should wait before retrying, when that is known.
    pub fn retry_after(&self) -> Option<Nanos> {
        match self {
            EngineError::Rejected(
                Rejection::QueueFull { retry_after }
                | Rejection::SloUnattainable { retry_after, .. },
            ) => Some(*retry_after),
            _ => None,
        }
    }
}

enum Command {
    Submit(Box<GenerateRequest>, mpsc::UnboundedSender<Event>),
    Drain,
}

/// A handle to the engine thread. Cheap to clone; the thread stops when every handle is
/// dropped and the work in flight is done.
#[derive(Clone)]
pub struct Engine {
    tx: std_mpsc::Sender<Command>,
    snapshot: Arc<Mutex<SchedSnapshot>>,
    capacity: crate::ExecutorCapacity,
}

impl Engine {
    /// Start the engine thread. `make` builds the executor on that thread (llama.cpp
    /// contexts are not `Send`). Returns once the executor is built.
    pub fn spawn<E, F>(
        cfg: EngineConfig,
        metrics: EngineMetrics,
        make: F,
    ) -> Result<Engine, EngineError>
    where
        E: Executor,
        F: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let (tx, rx) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let snapshot = Arc::new(Mutex::new(SchedSnapshot::default()));
        let snap = snapshot.clone();
        std::thread::Builder::new()
            .name("tokenfab-engine".into())
            .spawn(move || {
                let exec = match make() {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let capacity = exec.capacity();
                let _ = ready_tx.send(Ok(capacity));
                Loop::new(cfg, exec, metrics, snap).run(&rx);
            })
            .map_err(|e| EngineError::Exec(e.to_string()))?;
        let capacity = ready_rx
            .recv()
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Exec)?;
        Ok(Engine {
            tx,
            snapshot,
            capacity,
        })
    }

    pub fn capacity(&self) -> crate::ExecutorCapacity {
        self.capacity
    }

    /// The scheduler's gauges as of the last step.
    pub fn snapshot(&self) -> SchedSnapshot {
        self.snapshot.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Queue a generation. Admission happens on the engine thread: a rejection arrives as
    /// the generation's first (and only) event, before any token.
    pub fn submit(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Command::Submit(Box::new(req), tx))
            .map_err(|_| EngineError::Stopped)?;
        Ok(Generation { rx })
    }

    /// Stop admitting new requests; those already admitted run to completion.
    pub fn drain(&self) {
        let _ = self.tx.send(Command::Drain);
    }
}

/// A request the engine is serving.
struct Active {
    tokens: Vec<TokenId>,
    prompt_len: usize,
    sampling: SamplingParams,
    tx: mpsc::UnboundedSender<Event>,
    arrived: Instant,
    band: Band,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    scheduled: bool,
}

struct Loop<E> {
    sched: Scheduler,
    exec: E,
    active: HashMap<RequestId, Active>,
    next_id: u64,
    epoch: Instant,
    metrics: EngineMetrics,
    snapshot: Arc<Mutex<SchedSnapshot>>,
    rng: rand::rngs::StdRng,
    /// `EngineConfig::linger_ms`.
    linger: Duration,
}

impl<E: Executor> Loop<E> {
    fn new(
        cfg: EngineConfig,
        exec: E,
        metrics: EngineMetrics,
        snapshot: Arc<Mutex<SchedSnapshot>>,
    ) -> Self {
        use rand::SeedableRng;
        let sched = Scheduler::new(cfg.sched_config(&exec.capacity()));
        Loop {
            sched,
            exec,
            active: HashMap::new(),
            next_id: 1,
            epoch: Instant::now(),
            metrics,
            snapshot,
            rng: rand::rngs::StdRng::from_entropy(),
            linger: Duration::from_millis(u64::from(cfg.linger_ms)),
        }
    }

    fn now(&self) -> Nanos {
        Nanos::from(self.epoch.elapsed())
    }

    fn run(mut self, rx: &std_mpsc::Receiver<Command>) {
        loop {
            // Intake: block only when there is nothing to do.
            if self.sched.is_idle() {
                self.publish();
                match rx.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.command(cmd);
            }
            if self.linger > Duration::ZERO && self.sched.next_step_follows_ends() {
                let until = Instant::now() + self.linger;
                loop {
                    match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                        Ok(cmd) => self.command(cmd),
                        Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
            self.reap_cancelled();
            let worked = self.step();
            self.publish();
            if !worked && !self.sched.is_idle() {
                // Requests wait but none can be scheduled right now: wait for news
                // instead of spinning.
                match rx.recv_timeout(std::time::Duration::from_millis(20)) {
                    Ok(cmd) => self.command(cmd),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req, tx) => self.submit(*req, tx),
            Command::Drain => self.sched.drain(),
        }
    }

    fn submit(&mut self, req: GenerateRequest, tx: mpsc::UnboundedSender<Event>) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let now = self.now();
        let scope = match &req.cache_scope {
            Some(s) => format!("shared:{s}"),
            None => format!("tenant:{}", req.tenant),
        };
        let block_hashes = prefix_hashes(&scope, &req.prompt, self.sched.blocks().block_tokens());
        let sreq = SchedRequest {
            id,
            tenant: req.tenant,
            band: req.band,
            weight: req.weight.max(1),
            prompt: Tokens(req.prompt.len() as u64),
            max_new: req.max_new,
            arrival: now,
            slo: req.slo,
            block_hashes,
        };
        match self.sched.admit(now, sreq) {
            Ok(shed) => {
                let mut sampling = req.sampling;
                sampling.seed = match req.seed {
                    Some(s) => s,
                    None => rand::Rng::gen(&mut self.rng),
                };
                self.active.insert(
                    id,
                    Active {
                        prompt_len: req.prompt.len(),
                        tokens: req.prompt,
                        sampling,
                        tx,
                        arrived: Instant::now(),
                        band: req.band,
                        first_token: None,
                        last_token: None,
                        scheduled: false,
                    },
                );
                self.ended(shed);
            }
            Err(r) => {
                self.metrics.rejected.inc();
                let _ = tx.send(Event::Failed(EngineError::Rejected(r)));
            }
        }
    }

    /// Cancel requests whose client dropped its `Generation`.
    fn reap_cancelled(&mut self) {
        let gone: Vec<RequestId> = self
            .active
            .iter()
            .filter(|(_, a)| a.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(e) = self.sched.cancel(id) {
                self.ended(vec![e]);
            } else {
                self.active.remove(&id);
            }
        }
    }

    /// Plan and execute one step; false when there was nothing to run.
    fn step(&mut self) -> bool {
        let now = self.now();
        let plan = self.sched.plan(now);
        for slot in &plan.release {
            self.exec.release(*slot);
        }
        for (slot, from) in &plan.trim {
            self.exec.trim(*slot, *from);
        }
        for (id, slot) in &plan.start {
            if let Some(a) = self.active.get_mut(id) {
                if !a.scheduled {
                    a.scheduled = true;
                    let _ = a.tx.send(Event::Scheduled);
                }
                if a.first_token.is_none() {
                    let waited = a.arrived.elapsed().as_secs_f64();
                    self.metrics.queue_time.observe(waited);
                    self.metrics
                        .queue_time_band
                        .with_label_values(&[a.band.as_str()])
                        .observe(waited);
                }
                self.exec.begin(*slot, &a.sampling);
            }
        }
        for c in &plan.copies {
            self.exec.copy_prefix(c.from, c.to, c.tokens);
        }
        if plan.work.is_empty() {
            return !plan.is_empty();
        }
        let mut batch = Vec::with_capacity(plan.work.len());
        for w in &plan.work {
            let Some(a) = self.active.get(&w.id) else {
                continue;
            };
            let (start, end) = (w.pos as usize, w.pos as usize + w.n as usize);
            batch.push(BatchEntry {
                slot: w.slot,
                pos: w.pos,
                tokens: &a.tokens[start..end.min(a.tokens.len())],
                sample: w.sample,
            });
        }
        let started = Instant::now();
        let out = self.exec.run(&batch);
        let elapsed = started.elapsed();
        self.metrics.step_time.observe(elapsed.as_secs_f64());
        tracing::debug!(
            seqs = plan.work.len(),
            decodes = plan.work.iter().filter(|w| w.is_decode()).count(),
            tokens = plan.tokens(),
            started = plan.start.len(),
            reused = plan.copies.iter().map(|c| c.tokens).sum::<u64>(),
            waiting = self.sched.snapshot().waiting.iter().sum::<u32>(),
            // The learned step-time model this plan was sized with.
            // (Field values are computed only when debug logging is on.)
            fit_prefill_ms_per_token = ?self.sched.step_times().prefill_coefficients().map(|(a, _)| a * 1e3),
            fit_prefill_us_per_kv_token = ?self.sched.step_times().prefill_coefficients().map(|(_, b)| b * 1e6),
            fit_decodes_ms = ?self.sched.step_times().decode_time(plan.work.iter().filter(|w| w.is_decode()).count()).map(|t| t * 1e3),
            ms = elapsed.as_secs_f64() * 1e3,
            "step"
        );
        let sampled = match out {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "executor step failed; failing its requests");
                for id in self.sched.fail_step() {
                    if let Some(a) = self.active.remove(&id) {
                        let _ = a.tx.send(Event::Failed(EngineError::Exec(e.to_string())));
                    }
                }
                return true;
            }
        };
        let now_i = Instant::now();
        let mut result = StepResult {
            sampled: Vec::with_capacity(sampled.len()),
            elapsed: Nanos::from(elapsed),
        };
        let mut sampled = sampled.into_iter();
        for w in plan.work.iter().filter(|w| w.sample) {
            let Some(s) = sampled.next() else { break };
            let Some(a) = self.active.get_mut(&w.id) else {
                result.sampled.push((w.id, s.eog));
                continue;
            };
            let eog = s.eog && !a.sampling.ignore_eos;
            result.sampled.push((w.id, eog));
            match a.last_token {
                None => self.metrics.ttft.observe((now_i - a.arrived).as_secs_f64()),
                Some(t) => self.metrics.itl.observe((now_i - t).as_secs_f64()),
            }
            a.first_token.get_or_insert(now_i);
            a.last_token = Some(now_i);
            a.tokens.push(s.token);
            if !eog && a.tx.send(Event::Token(s.token)).is_ok() {
                self.metrics.delivered_tokens.inc();
            }
        }
        let prompt_tokens: u64 = plan
            .work
            .iter()
            .filter(|w| !w.is_decode())
            .map(|w| u64::from(w.n))
            .sum();
        self.metrics.prompt_tokens.inc_by(prompt_tokens);
        self.metrics
            .generation_tokens
            .inc_by(result.sampled.len() as u64);
        let ended = self.sched.complete(self.now(), &result);
        self.ended(ended);
        true
    }

    fn ended(&mut self, ended: Vec<Ended>) {
        for e in ended {
            let Some(a) = self.active.remove(&e.id()) else {
                continue;
            };
            match e {
                Ended::Finished { reason, cached, .. } => {
                    self.metrics.observe_finish(reason, a.arrived.elapsed());
                    // The eog token is not part of the completion.
                    let mut completion = (a.tokens.len() - a.prompt_len) as u64;
                    if reason == FinishReason::Stop {
                        completion = completion.saturating_sub(1);
                    }
                    let usage = Usage {
                        prompt_tokens: a.prompt_len as u64,
                        cached_tokens: cached.0,
                        completion_tokens: completion,
                    };
                    let _ = a.tx.send(Event::Finished { reason, usage });
                }
                Ended::Shed { retry_after, .. } => {
                    self.metrics.rejected.inc();
                    let _ =
                        a.tx.send(Event::Failed(EngineError::Rejected(Rejection::QueueFull {
                            retry_after,
                        })));
                }
            }
        }
    }

    fn publish(&mut self) {
        let snap = self.sched.snapshot();
        self.metrics.set_gauges(&snap, self.sched.stats());
        if let Ok(mut s) = self.snapshot.lock() {
            *s = snap;
        }
    }
}
