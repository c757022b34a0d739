//! Step plans: what one executor step computes. The core plans, the driver executes,
//! then reports what was sampled.

use tokenfab_types::{Nanos, RequestId, SeqSlot};

/// One sequence's share of a step: feed `n` tokens starting at position `pos` (the
/// sequence's token stream is prompt then generated tokens; the driver holds the
/// contents) and, when `sample` is set, sample the next token from the last position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    pub id: RequestId,
    pub slot: SeqSlot,
    pub pos: u64,
    pub n: u32,
    pub sample: bool,
}

impl Work {
    /// A decode is one token that continues a sequence whose prompt is already in KV.
    pub fn is_decode(&self) -> bool {
        self.n == 1 && self.pos > 0 && self.sample
    }
}

/// Copy the first `tokens` positions of the sequence in `from` into `to` (prefix reuse; on
/// a unified KV cache the cells are shared, not duplicated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixCopy {
    pub from: SeqSlot,
    pub to: SeqSlot,
    pub tokens: u64,
}

/// Everything the executor does in one step, in this order:
/// 1. `release`: clear the KV of these slots (ended, preempted or evicted sequences);
/// 2. `trim`: drop positions from `.1` on of these slots (a finished sequence kept as a
///    prefix-cache entry keeps only its indexed blocks);
/// 3. `start`: set up sampling for new sequences in these slots, whose KV is empty or,
///    for a sequence that took a cache entry's slot over, its prefix (trimmed in 2.);
/// 4. `copies`: share cached prefixes into started slots;
/// 5. `work`: run as one batch.
///
/// A slot used as a copy source is never released, trimmed or started in the same plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub release: Vec<SeqSlot>,
    pub trim: Vec<(SeqSlot, u64)>,
    pub start: Vec<(RequestId, SeqSlot)>,
    pub copies: Vec<PrefixCopy>,
    pub work: Vec<Work>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.work.is_empty() && self.release.is_empty() && self.trim.is_empty()
    }

    pub fn tokens(&self) -> u64 {
        self.work.iter().map(|w| u64::from(w.n)).sum()
    }
}

/// What the driver reports after executing a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepResult {
    /// For each `Work` with `sample`, in plan order: whether the sampled token ends the
    /// generation (end-of-generation token).
    pub sampled: Vec<(RequestId, bool)>,
    /// How long the step took (wall time on hardware, modelled time in the simulator).
    pub elapsed: Nanos,
}
