//! The boundary between the engine loop and the hardware: run one batch, sample tokens.

use tokenfab_types::{SeqSlot, TokenId};

/// Sampling parameters of one sequence. `temperature == 0` means greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    /// Seed of the sequence's random source; the engine picks one when the client did not.
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (vLLM's and
    /// llama.cpp's `ignore_eos`): benchmarks use it so every server generates the same
    /// number of tokens.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

/// What an executor can hold; the engine sizes the scheduler from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecutorCapacity {
    /// Sequence slots (running sequences plus prefix-cache entries).
    pub slots: u32,
    /// KV cells (tokens) across all sequences.
    pub kv_tokens: u64,
    /// Tokens one sequence can hold (the model's context).
    pub max_seq_tokens: u64,
    /// Tokens one batch can carry.
    pub max_batch_tokens: u32,
    /// Each slot is a separate KV stream: a prefix copy moves a whole stream, and only
    /// consecutive slots share a kernel micro-batch (see `SchedConfig::adopt_cached_slots`).
    pub stream_per_slot: bool,
    /// Fewest rows one sequence's prefill piece needs to take the kernels' fast path
    /// (1: the kernels have no such threshold). The scheduler does not cut a piece
    /// shorter than this to keep a step's time target (`SchedConfig::min_prefill_piece`).
    pub fast_prefill_rows: u32,
}

/// One sequence's part of a batch: `tokens` at positions `pos..pos + tokens.len()`.
#[derive(Clone, Copy, Debug)]
pub struct BatchEntry<'a> {
    pub slot: SeqSlot,
    pub pos: u64,
    pub tokens: &'a [TokenId],
    /// Sample the next token after the last of `tokens`.
    pub sample: bool,
}

/// A sampled token; `eog` when it ends the generation (the model's end tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampled {
    pub token: TokenId,
    pub eog: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("executor has no KV space for the batch")]
    NoKvSpace,
    #[error("executor failed: {0}")]
    Failed(String),
}

/// Runs batches on some hardware. Implementations: `tokenfab_llama::LlamaExecutor` (real
/// kernels) and the simulator's timing model. All methods run on the engine thread.
pub trait Executor {
    fn capacity(&self) -> ExecutorCapacity;

    /// Forget a slot's KV cells and sampler state.
    fn release(&mut self, slot: SeqSlot);

    /// Prepare a slot for a new sequence (called before its first batch entry, and again
    /// after a preemption restarts it): set up its sampler. Its KV is already as the plan
    /// wants it: empty (released earlier), or exactly a prefix the sequence took over
    /// from a cache entry in place (trimmed earlier in the same plan).
    fn begin(&mut self, slot: SeqSlot, params: &SamplingParams);

    /// Make positions `0..tokens` of `from` part of `to` as well (prefix reuse).
    fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, tokens: u64);

    /// Drop the KV of positions `from..` of a slot.
    fn trim(&mut self, slot: SeqSlot, from: u64);

    /// Run one batch. Returns one [`Sampled`] per entry with `sample`, in entry order.
    fn run(&mut self, batch: &[BatchEntry<'_>]) -> Result<Vec<Sampled>, ExecError>;
}
