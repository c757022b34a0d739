//! The scheduler state machine: admit → wait → run (chunked prefill, then decode) → end.

use crate::admit::Rejection;
use crate::kv::{BlockId, BlockPool};
use crate::queue::{Fairness, WaitQueue, Waiting};
use crate::request::{Band, FinishReason, SchedRequest};
use crate::step::{StepPlan, StepResult, Work};
use tokenfab_types::{Nanos, RequestId, SeqSlot, TenantId, Tokens};

/// Limits the scheduler plans within. The driver derives them from its executor (slots,
/// KV size, context) and from configuration (budgets, queue bounds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedConfig {
    /// Concurrent sequences the executor can hold (llama.cpp `n_seq_max`).
    pub slots: u32,
    pub kv_blocks: u32,
    pub block_tokens: u32,
    /// Tokens one sequence may hold (prompt + generated): the model's context.
    pub max_seq_tokens: u64,
    /// Token budget of one step: decodes first, the rest goes to prefill chunks.
    pub max_step_tokens: u32,
    /// Largest prefill chunk of one sequence in one step.
    pub max_prefill_chunk: u32,
    /// Bounded queue: requests and prompt tokens waiting.
    pub max_waiting: u32,
    pub max_waiting_tokens: u64,
    /// Blocks kept free when admitting new sequences, so running decodes can grow
    /// without preempting straight away.
    pub watermark_blocks: u32,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            slots: 16,
            kv_blocks: 1024,
            block_tokens: 16,
            max_seq_tokens: 8192,
            max_step_tokens: 512,
            max_prefill_chunk: 512,
            max_waiting: 256,
            max_waiting_tokens: 1 << 20,
            watermark_blocks: 4,
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
    },
    /// Shed from the queue after admission to make room for a higher band.
    Shed { id: RequestId, retry_after: Nanos },
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
}

/// Gauges: the state at this instant, for metrics and routing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedSnapshot {
    pub running: u32,
    pub waiting: [u32; 3],
    pub waiting_tokens: u64,
    pub kv_blocks_used: u32,
    pub kv_blocks_total: u32,
}

#[derive(Clone, Debug)]
struct Running {
    req: SchedRequest,
    slot: SeqSlot,
    blocks: Vec<BlockId>,
    /// Tokens whose KV is computed.
    computed: u64,
    /// Prompt + generated tokens known to the driver.
    known: u64,
    generated: u64,
    /// Prompt tokens already charged to the tenant's fairness counter (recomputation
    /// after a preemption is not charged again).
    charged_prompt: u64,
}

impl Running {
    fn remaining_prefill(&self) -> u64 {
        self.known - self.computed
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedConfig,
    queue: WaitQueue,
    fair: Fairness,
    running: Vec<Running>,
    blocks: BlockPool,
    free_slots: Vec<SeqSlot>,
    release: Vec<SeqSlot>,
    inflight: Vec<Work>,
    stats: SchedStats,
    /// Exponentially weighted tokens/s of steps, for TTFT prediction.
    rate: Option<f64>,
    draining: bool,
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
            release: Vec::new(),
            inflight: Vec::new(),
            stats: SchedStats::default(),
            rate: None,
            draining: false,
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
    pub fn stats(&self) -> &SchedStats {
        &self.stats
    }
    pub fn fairness_counter(&self, t: &TenantId) -> u64 {
        self.fair.counter(t)
    }
    pub(crate) fn prefill_tokens_per_sec(&self) -> Option<f64> {
        self.rate
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
        }
    }

    /// Nothing waiting, running or left to release.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty() && self.release.is_empty()
    }

    pub fn is_known(&self, id: RequestId) -> bool {
        self.running.iter().any(|r| r.req.id == id) || self.queue.iter().any(|w| w.req.id == id)
    }

    /// Verify the internal invariants: every block is owned by exactly one running sequence
    /// (refcount 1) or free; blocks cover each sequence's computed tokens; slots are
    /// unique and either running or free. For property tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owned = vec![0u32; self.blocks.total() as usize];
        for r in &self.running {
            for b in &r.blocks {
                owned[b.0 as usize] += 1;
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
        for (i, n) in owned.iter().enumerate() {
            let refs = self.blocks.refcount(BlockId(i as u32));
            if refs != *n {
                return Err(format!("block {i}: refcount {refs} but {n} owners"));
            }
        }
        if self.blocks.free_count() + self.blocks.used_count() != self.blocks.total() {
            return Err("free + used != total".into());
        }
        let used_by_running: u32 = self.running.iter().map(|r| r.blocks.len() as u32).sum();
        if used_by_running != self.blocks.used_count() {
            return Err(format!(
                "{used_by_running} blocks held by sequences, {} used",
                self.blocks.used_count()
            ));
        }
        let mut slots: Vec<u32> = self
            .running
            .iter()
            .map(|r| r.slot.0)
            .chain(self.free_slots.iter().map(|s| s.0))
            .collect();
        slots.sort_unstable();
        if slots != (0..self.cfg.slots).collect::<Vec<_>>() {
            return Err(format!("slots are not a partition: {slots:?}"));
        }
        Ok(())
    }

    /// Stop admitting; running and queued requests continue.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Admit a request into the queue, or reject it. On success, returns the requests of
    /// lower bands shed to make room.
    pub fn admit(&mut self, _now: Nanos, req: SchedRequest) -> Result<Vec<Ended>, Rejection> {
        let result = self.try_admit(req);
        match &result {
            Ok(_) => self.stats.admitted += 1,
            Err(_) => self.stats.rejected += 1,
        }
        result
    }

    fn try_admit(&mut self, req: SchedRequest) -> Result<Vec<Ended>, Rejection> {
        if self.draining {
            return Err(Rejection::Draining);
        }
        self.validate(&req)?;
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
                self.queue.remove(id);
                self.stats.shed += 1;
                shed.push(Ended::Shed { id, retry_after });
            }
        }
        if !self.is_active(&req.tenant) {
            let min = self.active_min_counter();
            self.fair.lift(&req.tenant, min);
        }
        self.queue.push(req, Tokens(0));
        Ok(shed)
    }

    fn is_active(&self, t: &TenantId) -> bool {
        self.queue.contains_tenant(t) || self.running.iter().any(|r| &r.req.tenant == t)
    }

    fn active_min_counter(&self) -> Option<u64> {
        self.queue
            .tenants()
            .chain(self.running.iter().map(|r| &r.req.tenant))
            .map(|t| self.fair.counter(t))
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
            });
        }
        let i = self.running.iter().position(|r| r.req.id == id)?;
        let r = self.running.swap_remove(i);
        self.inflight.retain(|w| w.id != id);
        Some(self.end_running(r, FinishReason::Cancelled))
    }

    fn free_running(&mut self, r: &Running) {
        for b in &r.blocks {
            self.blocks.release(*b);
        }
        self.free_slots.push(r.slot);
        self.release.push(r.slot);
    }

    fn end_running(&mut self, r: Running, reason: FinishReason) -> Ended {
        self.free_running(&r);
        self.stats.finished += 1;
        Ended::Finished {
            id: r.req.id,
            reason,
            generated: Tokens(r.generated),
        }
    }

    /// Grow a running sequence's block table to hold `tokens` tokens.
    fn reserve(&mut self, i: usize, tokens: u64) -> bool {
        let need = self.blocks.blocks_for(tokens) as usize;
        while self.running[i].blocks.len() < need {
            match self.blocks.allocate() {
                Some(b) => self.running[i].blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// The running sequence to preempt first: lowest band, then highest fairness counter,
    /// then the most recent arrival.
    fn victim(&self) -> Option<usize> {
        (0..self.running.len()).max_by_key(|&i| {
            let r = &self.running[i];
            (r.req.band, self.fair.counter(&r.req.tenant), r.req.arrival)
        })
    }

    /// Preempt by recomputation: free the sequence's KV and requeue it with what it has
    /// generated so far, to be prefilled again.
    fn preempt(&mut self, i: usize) {
        let r = self.running.swap_remove(i);
        self.free_running(&r);
        self.stats.preemptions += 1;
        self.queue.push(r.req, Tokens(r.generated));
    }

    /// Plan the next step. Decodes of running sequences first (one token each), then
    /// prefill chunks of partially prefilled sequences, then new sequences from the queue,
    /// all within one token budget. Preempts when KV runs out for decodes.
    pub fn plan(&mut self, _now: Nanos) -> StepPlan {
        debug_assert!(self.inflight.is_empty(), "plan while a step is in flight");
        let mut budget = u64::from(self.cfg.max_step_tokens);
        let mut work = Vec::new();

        // 1. Decodes. Walk in admission order; when blocks run out, preempt the victim.
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let planned = work.iter().any(|w: &Work| w.id == r.req.id);
            if planned || r.computed == 0 || r.remaining_prefill() != 1 || budget == 0 {
                i += 1;
                continue;
            }
            let tokens = r.computed + 1;
            if self.reserve(i, tokens) {
                let r = &self.running[i];
                work.push(Work {
                    id: r.req.id,
                    slot: r.slot,
                    pos: r.computed,
                    n: 1,
                    sample: true,
                });
                budget -= 1;
                i += 1;
                continue;
            }
            let Some(v) = self.victim() else { break };
            let victim_id = self.running[v].req.id;
            work.retain(|w: &Work| w.id != victim_id);
            self.preempt(v);
            // Indices shifted (swap_remove): restart the walk; planned ones are skipped.
            budget = u64::from(self.cfg.max_step_tokens) - work.len() as u64;
            i = 0;
        }
        let planned: Vec<RequestId> = work.iter().map(|w| w.id).collect();

        // 2. Prefill chunks of running sequences, oldest first.
        for i in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            if planned.contains(&self.running[i].req.id) {
                continue;
            }
            if let Some(w) = self.prefill_chunk(i, &mut budget) {
                work.push(w);
            }
        }

        // 3. New sequences, in policy order, while a slot, blocks and budget remain.
        while budget > 0 && !self.free_slots.is_empty() {
            let Some(next) = self.queue.peek(&self.fair) else {
                break;
            };
            let known = next.req.prompt.0 + next.generated.0;
            let need = self.blocks.blocks_for(known.min(budget)) + self.cfg.watermark_blocks;
            if need > self.blocks.free_count() && !self.running.is_empty() {
                break;
            }
            let id = next.req.id;
            let Some(Waiting { req, generated, .. }) = self.queue.remove(id) else {
                break;
            };
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            self.running.push(Running {
                charged_prompt: if generated.0 > 0 { req.prompt.0 } else { 0 },
                req,
                slot,
                blocks: Vec::new(),
                computed: 0,
                known,
                generated: generated.0,
            });
            let i = self.running.len() - 1;
            match self.prefill_chunk(i, &mut budget) {
                Some(w) => work.push(w),
                None => {
                    // Not even one block: put it back and stop admitting.
                    let r = self.running.swap_remove(i);
                    self.free_slots.push(r.slot);
                    self.queue.push(r.req, Tokens(r.generated));
                    break;
                }
            }
        }

        self.inflight.clone_from(&work);
        if !work.is_empty() {
            self.stats.steps += 1;
        }
        StepPlan {
            release: std::mem::take(&mut self.release),
            work,
        }
    }

    fn prefill_chunk(&mut self, i: usize, budget: &mut u64) -> Option<Work> {
        let r = &self.running[i];
        let left = r.remaining_prefill();
        if left == 0 {
            return None;
        }
        let mut n = left.min(*budget).min(u64::from(self.cfg.max_prefill_chunk));
        // Shrink to what the free blocks can hold.
        let have = r.blocks.len() as u64 * u64::from(self.blocks.block_tokens());
        let room =
            have + u64::from(self.blocks.free_count()) * u64::from(self.blocks.block_tokens());
        n = n.min(room.saturating_sub(r.computed));
        if n == 0 {
            return None;
        }
        let end = r.computed + n;
        if !self.reserve(i, end) {
            return None;
        }
        let r = &self.running[i];
        *budget -= n;
        Some(Work {
            id: r.req.id,
            slot: r.slot,
            pos: r.computed,
            n: n as u32,
            sample: end == r.known,
        })
    }

    /// Apply the result of the last planned step: advance sequences, end those that
    /// finished. Returns the requests that ended.
    pub fn complete(&mut self, _now: Nanos, result: &StepResult) -> Vec<Ended> {
        let work = std::mem::take(&mut self.inflight);
        let tokens: u64 = work.iter().map(|w| u64::from(w.n)).sum();
        if result.elapsed.0 > 0 && tokens > 0 {
            let r = tokens as f64 / result.elapsed.as_secs_f64();
            self.rate = Some(match self.rate {
                Some(old) => 0.8 * old + 0.2 * r,
                None => r,
            });
        }
        let mut sampled = result.sampled.iter();
        let mut ended = Vec::new();
        for w in &work {
            let eog = if w.sample {
                sampled
                    .next()
                    .filter(|(id, _)| *id == w.id)
                    .map(|(_, e)| *e)
            } else {
                None
            };
            let Some(i) = self.running.iter().position(|r| r.req.id == w.id) else {
                continue;
            };
            let r = &mut self.running[i];
            r.computed += u64::from(w.n);
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
            let (tenant, weight) = (r.req.tenant.clone(), r.req.weight);
            self.fair.charge(&tenant, weight, new_prompt, out);
            if let Some(reason) = reason {
                let r = self.running.swap_remove(i);
                ended.push(self.end_running(r, reason));
            }
        }
        ended
    }
}
