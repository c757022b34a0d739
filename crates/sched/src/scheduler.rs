//! The scheduler state machine: admit → wait → run (chunked prefill, then decode) → end,
//! with finished prompts kept as prefix-cache entries until evicted. Planning lives in
//! `plan.rs`, the prefix cache in `cache.rs`.

use crate::admit::Rejection;
use crate::cache::CachedSeq;
use crate::kv::{BlockId, BlockPool};
use crate::queue::{Fairness, WaitQueue};
use crate::quota::{KvQuota, Owners};
use crate::request::{Band, FinishReason, SchedRequest};
use crate::step::{StepPlan, StepResult, Work};
use crate::timing::StepTimes;
use std::collections::BTreeMap;
use tokenfab_types::{Nanos, RequestId, SeqSlot, TenantId, Tokens};

/// Limits the scheduler plans within. The driver derives them from its executor (slots,
/// KV size, context) and from configuration (budgets, queue bounds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Sequence slots of the executor (llama.cpp `n_seq_max`): running sequences plus
    /// prefix-cache entries.
    pub slots: u32,
    /// Sequences in the running batch at most.
    pub max_running: u32,
    pub kv_blocks: u32,
    pub block_tokens: u32,
    /// Tokens one sequence may hold (prompt + generated): the model's context.
    pub max_seq_tokens: u64,
    /// Token budget of one step: decodes first, the rest goes to prefill chunks.
    pub max_step_tokens: u32,
    /// Largest prefill chunk of one sequence in one step.
    pub max_prefill_chunk: u32,
    /// Fewest rows a prefill piece of one sequence needs for the executor's fast kernel
    /// path (`ExecutorCapacity::fast_prefill_rows`; 1: no such threshold). The step's
    /// time target never cuts a piece shorter than this (the prompt's end, the block
    /// boundary before its tail and the step's token budget still may): below it every
    /// row costs more, so a shorter piece buys the streams beside it little time and
    /// the prompt much. A step's first piece gets these rows beyond its time; a later
    /// one that would not waits for a later step.
    pub min_prefill_piece: u32,
    /// Bounded queue: requests and prompt tokens waiting.
    pub max_waiting: u32,
    pub max_waiting_tokens: u64,
    /// Blocks kept free when admitting new sequences, so running decodes can grow
    /// without preempting straight away.
    pub watermark_blocks: u32,
    /// Step time to aim for while sequences are decoding (their inter-token latency):
    /// prefill chunks are sized from measured step times to fit it. `None`: always use
    /// the whole token budget.
    pub target_step: Option<Nanos>,
    /// KV quotas of named tenants (others have none). A cap is also the longest sequence
    /// the tenant can run: longer prompts are rejected, `max_new` is clamped to fit.
    pub kv_quotas: BTreeMap<TenantId, KvQuota>,
    /// Each slot is its own KV stream (llama.cpp's per-sequence layout): a new sequence
    /// whose prefix is cached in an entry takes that entry's slot over in place (trimmed
    /// to the prefix) instead of copying the whole stream, and running sequences keep to
    /// few consecutive slots, which the executor batches together.
    pub adopt_cached_slots: bool,
    /// A short request of a tenant that is the least served (VTC, within one chunk's
    /// charge) and runs less than half its weighted share of the batch gets steps of its
    /// own until its first token:
    /// the work of tenants above their share (and of lower bands) waits those steps
    /// (`Scheduler::quiet_start`). Buys a quiet tenant's first token freedom from a
    /// flood's batch, at the flood's streams waiting those steps (two for most chats).
    pub isolate_quiet_starts: bool,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            slots: 64,
            max_running: 16,
            kv_blocks: 1024,
            block_tokens: 16,
            max_seq_tokens: 8192,
            max_step_tokens: 512,
            max_prefill_chunk: 512,
            min_prefill_piece: 1,
            max_waiting: 256,
            max_waiting_tokens: 1 << 20,
            watermark_blocks: 4,
            target_step: Some(Nanos::from_millis(250)),
            kv_quotas: BTreeMap::new(),
            adopt_cached_slots: false,
            isolate_quiet_starts: true,
        }
    }
}

/// How a request left the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    Finished {
        id: RequestId,
        reason: FinishReason,
        generated: Tokens,
        /// Prompt tokens served from the prefix cache (in the last run, after any
        /// preemption).
        cached: Tokens,
    },
    /// Shed from the queue after admission to make room for a higher band (`generated`:
    /// tokens it produced before a preemption sent it back to the queue).
    Shed {
        id: RequestId,
        retry_after: Nanos,
        generated: Tokens,
    },
}

impl Ended {
    pub fn id(&self) -> RequestId {
        match self {
            Ended::Finished { id, .. } | Ended::Shed { id, .. } => *id,
        }
    }
}

/// Monotonic counters, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    pub steps: u64,
    pub preemptions: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub admitted: u64,
    pub rejected: u64,
    pub shed: u64,
    pub finished: u64,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Prefix-cache entries evicted.
    pub evictions: u64,
    /// Steps that started a quiet tenant's request with busier tenants' work held
    /// (`SchedConfig::isolate_quiet_starts`).
    pub quiet_starts: u64,
}

/// Gauges: the state at this instant, for metrics and routing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedSnapshot {
    pub running: u32,
    pub waiting: [u32; 3],
    pub waiting_tokens: u64,
    pub kv_blocks_used: u32,
    pub kv_blocks_total: u32,
    /// Finished sequences kept for their prefixes.
    pub cached_seqs: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct Running {
    pub req: SchedRequest,
    /// The tenant's block-owner index.
    pub owner: u32,
    pub slot: SeqSlot,
    pub blocks: Vec<BlockId>,
    /// Tokens whose KV is computed.
    pub computed: u64,
    /// Prompt + generated tokens known to the driver.
    pub known: u64,
    pub generated: u64,
    /// Prompt tokens reused from the prefix cache in this run.
    pub cached: u64,
    /// Prompt tokens already charged to the tenant's fairness counter (recomputation
    /// after a preemption and cache hits are not charged).
    pub charged_prompt: u64,
    /// Has work in the plan being built (so planning stays linear in the batch).
    pub planned: bool,
    /// Started alone for a quiet tenant (`Scheduler::quiet_start`): until `computed`
    /// reaches this, the tenants it was started apart from wait. 0: not so started.
    pub quiet_until: u64,
}

impl Running {
    /// Preemption order among otherwise equal victims (lower first): the least computed
    /// (cheapest to redo), then the latest arrival.
    pub fn recompute_order(&self) -> (u64, std::cmp::Reverse<Nanos>) {
        (self.computed, std::cmp::Reverse(self.req.arrival))
    }

    pub fn remaining_prefill(&self) -> u64 {
        self.known - self.computed
    }

    /// Whether its next work is a decode: its prompt is computed, up to the last token
    /// sampled.
    pub fn decodes_next(&self) -> bool {
        self.computed > 0 && self.remaining_prefill() == 1
    }
}

#[derive(Debug)]
pub struct Scheduler {
    pub(crate) cfg: SchedConfig,
    pub(crate) queue: WaitQueue,
    pub(crate) fair: Fairness,
    pub(crate) running: Vec<Running>,
    pub(crate) cached: Vec<CachedSeq>,
    pub(crate) blocks: BlockPool,
    pub(crate) free_slots: Vec<SeqSlot>,
    /// KV operations owed to the executor, handed over with the next plan.
    pub(crate) release: Vec<SeqSlot>,
    pub(crate) trim: Vec<(SeqSlot, u64)>,
    pub(crate) inflight: Vec<Work>,
    pub(crate) stats: SchedStats,
    /// Learned step times: sizes prefill chunks and predicts TTFT.
    pub(crate) times: StepTimes,
    /// Tenants as block owners, with their KV quotas.
    pub(crate) owners: Owners,
    draining: bool,
    /// The last plan gave a prefill piece more rows than its time target left (the
    /// step's floor): the next one, if streams decode, gives prefill no floor.
    pub(crate) raised_piece: bool,
    /// The last completed step ended requests (read once by `next_step_follows_ends`).
    ended_last: bool,
    /// The latest time passed in, for LRU order of cache entries.
    pub(crate) now: Nanos,
}

impl Scheduler {
    pub fn new(cfg: SchedConfig) -> Self {
        Scheduler {
            blocks: BlockPool::new(cfg.kv_blocks, cfg.block_tokens),
            free_slots: (0..cfg.slots).rev().map(SeqSlot).collect(),
            cfg,
            queue: WaitQueue::default(),
            fair: Fairness::default(),
            running: Vec::new(),
            cached: Vec::new(),
            release: Vec::new(),
            trim: Vec::new(),
            inflight: Vec::new(),
            stats: SchedStats::default(),
            times: StepTimes::default(),
            owners: Owners::default(),
            draining: false,
            raised_piece: false,
            ended_last: false,
            now: Nanos::ZERO,
        }
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }
    pub fn blocks(&self) -> &BlockPool {
        &self.blocks
    }
    pub fn queue(&self) -> &WaitQueue {
        &self.queue
    }
    /// The learned step-time model (for the engine's debug log).
    pub fn step_times(&self) -> &StepTimes {
        &self.times
    }
    pub fn stats(&self) -> &SchedStats {
        &self.stats
    }
    /// Prefill throughput with the running batch as it is now (see
    /// [`StepTimes::prefill_tokens_per_sec`]).
    pub(crate) fn prefill_tokens_per_sec(&self) -> Option<f64> {
        let decodes = self
            .running
            .iter()
            .filter(|r| r.remaining_prefill() == 0)
            .count();
        self.times.prefill_tokens_per_sec(
            decodes,
            u64::from(self.cfg.max_step_tokens),
            self.cfg.target_step,
        )
    }
    pub(crate) fn running_prefill_backlog(&self) -> u64 {
        self.running.iter().map(|r| r.remaining_prefill()).sum()
    }

    pub fn snapshot(&self) -> SchedSnapshot {
        SchedSnapshot {
            running: self.running.len() as u32,
            waiting: Band::ALL.map(|b| self.queue.len_band(b) as u32),
            waiting_tokens: self.queue.tokens(),
            kv_blocks_used: self.blocks.used_count(),
            kv_blocks_total: self.blocks.total(),
            cached_seqs: self.cached.len() as u32,
        }
    }

    /// Whether a request is in the running batch (not waiting, not ended).
    pub fn is_running(&self, id: RequestId) -> bool {
        self.running.iter().any(|r| r.req.id == id)
    }

    /// Nothing waiting, running or owed to the executor. Prefix-cache entries may remain.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
            && self.running.is_empty()
            && self.release.is_empty()
            && self.trim.is_empty()
    }

    /// Stop admitting; running and queued requests continue.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Admit a request into the queue, or reject it. On success, returns the requests of
    /// lower bands shed to make room.
    pub fn admit(&mut self, now: Nanos, req: SchedRequest) -> Result<Vec<Ended>, Rejection> {
        self.now = self.now.max(now);
        let result = self.try_admit(req);
        match &result {
            Ok(_) => self.stats.admitted += 1,
            Err(_) => self.stats.rejected += 1,
        }
        result
    }

    fn try_admit(&mut self, mut req: SchedRequest) -> Result<Vec<Ended>, Rejection> {
        if self.draining {
            return Err(Rejection::Draining);
        }
        self.validate(&req)?;
        let owner = self.owners.intern(&req.tenant, &self.cfg.kv_quotas);
        if let Some(cap) = self.owners.quota(owner).max_blocks {
            let limit = Tokens(u64::from(cap) * u64::from(self.blocks.block_tokens()));
            if req.prompt >= limit {
                return Err(Rejection::OverKvQuota {
                    limit,
                    prompt: req.prompt,
                });
            }
            req.max_new = req.max_new.min(Tokens(limit.0 - req.prompt.0));
        }
        if let (Some(target), Some(predicted)) = (req.slo.ttft, self.predict_ttft(&req)) {
            if predicted > target {
                return Err(Rejection::SloUnattainable {
                    predicted_ttft: predicted,
                    retry_after: self.retry_after(req.prompt.0),
                });
            }
        }
        let mut shed = Vec::new();
        if !self.has_room(&req) {
            let victims = self.shed_plan(&req).ok_or(Rejection::QueueFull {
                retry_after: self.retry_after(req.prompt.0),
            })?;
            let retry_after = self.retry_after(0);
            for id in victims {
                let generated = self.queue.remove(id).map_or(Tokens(0), |w| w.generated);
                self.stats.shed += 1;
                shed.push(Ended::Shed {
                    id,
                    retry_after,
                    generated,
                });
            }
        }
        if !self.is_active(owner) {
            let min = self.active_min_counter();
            self.fair.lift(owner, min);
        }
        let cached = self.cached_prompt_tokens(&req);
        self.queue.push(req, owner, Tokens(0), cached);
        Ok(shed)
    }

    fn is_active(&self, owner: u32) -> bool {
        self.queue.contains_owner(owner) || self.running.iter().any(|r| r.owner == owner)
    }

    pub(crate) fn active_min_counter(&self) -> Option<u64> {
        self.queue
            .owners()
            .chain(self.running.iter().map(|r| r.owner))
            .map(|o| self.fair.counter(o))
            .min()
    }

    /// Cancel a waiting or running request; `None` if it is not known (already ended).
    pub fn cancel(&mut self, id: RequestId) -> Option<Ended> {
        if let Some(w) = self.queue.remove(id) {
            self.stats.finished += 1;
            return Some(Ended::Finished {
                id,
                reason: FinishReason::Cancelled,
                generated: w.generated,
                cached: Tokens(0),
            });
        }
        let i = self.running.iter().position(|r| r.req.id == id)?;
        let r = self.running.swap_remove(i);
        self.inflight.retain(|w| w.id != id);
        Some(self.end_running(r, FinishReason::Cancelled))
    }

    /// The last planned step failed on the executor: its KV contents are unknown, so every
    /// sequence in it ends (nothing of theirs enters the prefix cache).
    pub fn fail_step(&mut self) -> Vec<RequestId> {
        let work = std::mem::take(&mut self.inflight);
        let mut failed = Vec::new();
        for w in work {
            if let Some(i) = self.running.iter().position(|r| r.req.id == w.id) {
                let r = self.running.swap_remove(i);
                self.free_running(&r);
                self.stats.finished += 1;
                failed.push(w.id);
            }
        }
        failed
    }

    /// Give back a sequence's blocks and slot.
    pub(crate) fn free_running(&mut self, r: &Running) {
        for b in &r.blocks {
            self.blocks.release(*b, r.slot);
        }
        self.free_slots.push(r.slot);
        self.release.push(r.slot);
    }

    fn end_running(&mut self, r: Running, reason: FinishReason) -> Ended {
        self.stats.finished += 1;
        let ended = Ended::Finished {
            id: r.req.id,
            reason,
            generated: Tokens(r.generated),
            cached: Tokens(r.cached),
        };
        self.retire(r);
        ended
    }

    /// Apply the result of the last planned step: advance sequences, index newly computed
    /// prompt blocks, end those that finished. Returns the requests that ended.
    pub fn complete(&mut self, now: Nanos, result: &StepResult) -> Vec<Ended> {
        self.now = self.now.max(now);
        let work = std::mem::take(&mut self.inflight);
        let decodes = work.iter().filter(|w| w.is_decode()).count();
        let (prefill, attended) = (work.iter().filter(|w| !w.is_decode()))
            .map(|w| {
                (
                    u64::from(w.n),
                    crate::timing::attended(w.pos, u64::from(w.n)),
                )
            })
            .fold((0, 0), |(n, a), (wn, wa)| (n + wn, a + wa));
        self.times
            .observe(decodes, prefill, attended, result.elapsed);
        let mut sampled = result.sampled.iter();
        let mut ended = Vec::new();
        let bt = u64::from(self.blocks.block_tokens());
        // Where each work item's sequence is in the running batch: work follows the batch's
        // order unless a cancel reshuffled it, so try the slot after the last match first
        // and index the batch (once) only on a miss. Finished sequences leave after the loop.
        let mut at: Option<rustc_hash::FxHashMap<RequestId, usize>> = None;
        let mut hint = 0;
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        for w in &work {
            let eog = if w.sample {
                sampled
                    .next()
                    .filter(|(id, _)| *id == w.id)
                    .map(|(_, e)| *e)
            } else {
                None
            };
            let i = if self.running.get(hint).is_some_and(|r| r.req.id == w.id) {
                hint
            } else {
                let at = at.get_or_insert_with(|| {
                    let at = self.running.iter().enumerate();
                    at.map(|(i, r)| (r.req.id, i)).collect()
                });
                let Some(&i) = at.get(&w.id) else {
                    continue;
                };
                i
            };
            hint = i + 1;
            let r = &mut self.running[i];
            r.computed += u64::from(w.n);
            // Index prompt blocks that are now fully computed.
            let full = ((r.computed / bt) as usize).min(r.req.block_hashes.len());
            for k in (w.pos / bt) as usize..full {
                self.blocks.register(r.blocks[k], r.req.block_hashes[k]);
            }
            let new_prompt = r
                .req
                .prompt
                .0
                .min(r.computed)
                .saturating_sub(r.charged_prompt);
            r.charged_prompt += new_prompt;
            if w.is_decode() {
                self.stats.decode_tokens += 1;
            } else {
                self.stats.prefill_tokens += u64::from(w.n);
            }
            let mut out = 0;
            let mut reason = None;
            if let Some(eog) = eog {
                r.generated += 1;
                r.known += 1;
                out = 1;
                if eog {
                    reason = Some(FinishReason::Stop);
                } else if r.generated >= r.req.max_new.0 || r.known >= self.cfg.max_seq_tokens {
                    reason = Some(FinishReason::Length);
                }
            }
            self.fair.charge(r.owner, r.req.weight, new_prompt, out);
            if let Some(reason) = reason {
                finished.push((i, reason));
            }
        }
        // Highest index first: each swap_remove then moves an element that stays.
        finished.sort_unstable_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, reason) in finished {
            let r = self.running.swap_remove(i);
            ended.push(self.end_running(r, reason));
        }
        ended.sort_unstable_by_key(|e| e.id());
        self.ended_last = !ended.is_empty();
        ended
    }

    /// Whether the step about to be planned comes right after one that ended requests
    /// and would only prefill prompts already running, with no stream decoding: a step
    /// timed as idle (up to twice the target), which the ended requests' successors
    /// would wait out whole. Clients in a closed loop (agents, pipelines, benchmarks)
    /// send those within milliseconds, so a driver may wait that long for arrivals first
    /// (`EngineConfig::linger_ms`). With nothing running the driver waits for arrivals
    /// anyway: false, so that a lone client's next request starts at once. True at most
    /// once per ending step.
    pub fn next_step_follows_ends(&mut self) -> bool {
        std::mem::take(&mut self.ended_last)
            && !self.running.is_empty()
            && !self.running.iter().any(Running::decodes_next)
    }

    /// Verify the internal invariants: every block's holders are exactly the slots whose
    /// sequences (running or cached) include it; blocks cover each sequence's computed
    /// tokens; slots are partitioned into running, cached and free. For property tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut expect: Vec<Vec<SeqSlot>> = vec![Vec::new(); self.blocks.total() as usize];
        for r in &self.running {
            for b in &r.blocks {
                expect[b.0 as usize].push(r.slot);
            }
            let cover = r.blocks.len() as u64 * u64::from(self.blocks.block_tokens());
            if cover < r.computed {
                return Err(format!(
                    "{:?}: {} blocks do not cover {} tokens",
                    r.req.id,
                    r.blocks.len(),
                    r.computed
                ));
            }
            if r.computed > r.known || r.generated > r.req.max_new.0 {
                return Err(format!(
                    "{:?}: computed {} known {} generated {}",
                    r.req.id, r.computed, r.known, r.generated
                ));
            }
        }
        for c in &self.cached {
            for b in &c.blocks {
                expect[b.0 as usize].push(c.slot);
            }
        }
        for (i, want) in expect.iter_mut().enumerate() {
            let mut have = self.blocks.holders(BlockId(i as u32)).to_vec();
            have.sort_unstable();
            want.sort_unstable();
            if have != *want {
                return Err(format!("block {i}: holders {have:?}, owners {want:?}"));
            }
        }
        let mut owned: BTreeMap<u32, u32> = BTreeMap::new();
        for (i, h) in expect.iter().enumerate() {
            if !h.is_empty() {
                *owned
                    .entry(self.blocks.owner(BlockId(i as u32)))
                    .or_default() += 1;
            }
        }
        for (&o, &n) in &owned {
            if self.blocks.owned(o) != n {
                return Err(format!(
                    "owner {o}: {n} blocks, {} charged",
                    self.blocks.owned(o)
                ));
            }
        }
        let used = expect.iter().filter(|h| !h.is_empty()).count() as u32;
        if used != self.blocks.used_count() {
            return Err(format!(
                "{used} blocks held, {} used",
                self.blocks.used_count()
            ));
        }
        let mut slots: Vec<u32> = self
            .running
            .iter()
            .map(|r| r.slot.0)
            .chain(self.cached.iter().map(|c| c.slot.0))
            .chain(self.free_slots.iter().map(|s| s.0))
            .collect();
        slots.sort_unstable();
        if slots != (0..self.cfg.slots).collect::<Vec<_>>() {
            return Err(format!("slots are not a partition: {slots:?}"));
        }
        Ok(())
    }

    /// Hand the owed KV operations to a plan.
    pub(crate) fn owed(&mut self) -> StepPlan {
        StepPlan {
            release: std::mem::take(&mut self.release),
            trim: std::mem::take(&mut self.trim),
            ..StepPlan::default()
        }
    }
}
