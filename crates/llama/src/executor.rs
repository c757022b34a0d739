//! The engine's [`Executor`] on llama.cpp: one context with a unified KV cache shared by
//! all sequence slots; each step is one or two `llama_decode` calls over every sequence's
//! tokens (see [`split_calls`]).

use crate::model::{backend, LoadedModel, ModelError};
use crate::sample::Sampler;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use tokenfab_engine::{BatchEntry, ExecError, Executor, ExecutorCapacity, Sampled, SamplingParams};
use tokenfab_types::{SeqSlot, TokenId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaExecutorConfig {
    /// KV cells shared by all sequences.
    pub kv_tokens: u32,
    /// Sequence slots (llama.cpp `n_seq_max`): running sequences plus prefix-cache
    /// entries.
    pub slots: u32,
    /// Tokens per `llama_decode` call.
    pub batch_tokens: u32,
    /// Tokens per kernel micro-batch (llama.cpp `n_ubatch`); sizes the compute buffer.
    pub ubatch_tokens: u32,
    /// CPU threads for the kernels; 0 = all available cores.
    pub threads: u32,
}

impl Default for LlamaExecutorConfig {
    fn default() -> Self {
        LlamaExecutorConfig {
            kv_tokens: 8192,
            slots: 64,
            batch_tokens: 512,
            ubatch_tokens: 256,
            threads: 0,
        }
    }
}

pub struct LlamaExecutor {
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    samplers: Vec<Option<Sampler>>,
    model: &'static llama_cpp_2::model::LlamaModel,
    capacity: ExecutorCapacity,
}

impl LlamaExecutor {
    /// Create the context. Must run on the thread that will use it (the engine thread).
    pub fn new(model: &LoadedModel, cfg: &LlamaExecutorConfig) -> Result<Self, ModelError> {
        let backend = backend()?;
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
        } else {
            cfg.threads as i32
        };
        let raw = model.raw();
        let kv_tokens = cfg.kv_tokens.max(256);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(kv_tokens))
            .with_n_batch(cfg.batch_tokens)
            .with_n_ubatch(cfg.ubatch_tokens.min(cfg.batch_tokens))
            .with_n_seq_max(cfg.slots.max(1))
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = raw
            .new_context(backend, params)
            .map_err(|e| ModelError::Load {
                path: model.name().to_owned(),
                reason: format!("context: {e}"),
            })?;
        let kv = u64::from(ctx.n_ctx());
        let capacity = ExecutorCapacity {
            slots: cfg.slots.max(1),
            kv_tokens: kv,
            max_seq_tokens: kv.min(u64::from(raw.n_ctx_train())),
            max_batch_tokens: ctx.n_batch(),
        };
        Ok(LlamaExecutor {
            batch: LlamaBatch::new(ctx.n_batch() as usize, 1),
            ctx,
            samplers: (0..capacity.slots).map(|_| None).collect(),
            model: raw,
            capacity,
        })
    }

    /// Logits of position `i` of the last `llama_decode` call (the step's last; for
    /// numerics tests, whose single-sequence steps are one call).
    pub fn logits(&self, i: i32) -> &[f32] {
        self.ctx.get_logits_ith(i)
    }
}

impl Executor for LlamaExecutor {
    fn capacity(&self) -> ExecutorCapacity {
        self.capacity
    }

    fn release(&mut self, slot: SeqSlot) {
        // Positions None..None: every cell of the sequence.
        let _ = self.ctx.clear_kv_cache_seq(Some(slot.0), None, None);
        if let Some(s) = self.samplers.get_mut(slot.0 as usize) {
            *s = None;
        }
    }

    fn begin(&mut self, slot: SeqSlot, params: &SamplingParams) {
        let _ = self.ctx.clear_kv_cache_seq(Some(slot.0), None, None);
        if let Some(s) = self.samplers.get_mut(slot.0 as usize) {
            *s = Some(Sampler::new(params));
        }
    }

    fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, tokens: u64) {
        let end = u32::try_from(tokens).unwrap_or(u32::MAX);
        let _ = self
            .ctx
            .kv_cache_seq_cp(from.0 as i32, to.0 as i32, Some(0), Some(end));
    }

    fn trim(&mut self, slot: SeqSlot, from: u64) {
        let start = u32::try_from(from).unwrap_or(u32::MAX);
        let _ = self.ctx.clear_kv_cache_seq(Some(slot.0), Some(start), None);
    }

    fn run(&mut self, batch: &[BatchEntry<'_>]) -> Result<Vec<Sampled>, ExecError> {
        let t0 = std::time::Instant::now();
        let mut out = Vec::with_capacity(batch.iter().filter(|e| e.sample).count());
        let (first, second) = split_calls(batch);
        for call in [first, second] {
            if !call.is_empty() {
                self.decode_call(batch, &call, &mut out)?;
            }
        }
        // The sampled tokens in the order of the batch's sampled entries.
        out.sort_unstable_by_key(|(i, _)| *i);
        tracing::trace!(
            tokens = batch.iter().map(|e| e.tokens.len()).sum::<usize>(),
            seqs = batch.len(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "llama step"
        );
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }
}

/// Batches of this many tokens or more take llama.cpp's tiled CPU flash-attention path,
/// whose tiles of 64 query rows skip a block of KV cells only when it is masked for every
/// row of the tile (`GGML_FA_TILE_Q` in ggml-cpu).
const FA_TILE_ROWS: usize = 64;

/// The `llama_decode` calls of one step, as indices into `batch`. In one call of 64+
/// tokens, every tile that holds single-token decode rows of many sequences computes all
/// of their KV for all of its rows: 16 decodes plus a 55-token prefill chunk measured
/// 438 ms in one call against 90 + 214 ms in two, on this project's CPU model. So when a
/// step mixes decodes with prefill chunks and reaches that size, decodes (and pieces
/// small enough to ride with them) go in one call and the prefill pieces in a second;
/// each call then reads the weights once more, which is the cheaper cost.
fn split_calls(batch: &[BatchEntry<'_>]) -> (Vec<usize>, Vec<usize>) {
    let total: usize = batch.iter().map(|e| e.tokens.len()).sum();
    let all = (0..batch.len()).collect();
    let pieces = batch.iter().filter(|e| e.tokens.len() > 1).count();
    if total < FA_TILE_ROWS || pieces == 0 || pieces == batch.len() {
        return (all, Vec::new());
    }
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut small_tokens = 0;
    // Decodes first (they are why the split pays), then the shortest pieces.
    let mut order: Vec<usize> = all;
    order.sort_by_key(|&i| batch[i].tokens.len());
    for i in order {
        let n = batch[i].tokens.len();
        if small_tokens + n < FA_TILE_ROWS {
            small_tokens += n;
            small.push(i);
        } else {
            large.push(i);
        }
    }
    small.sort_unstable();
    large.sort_unstable();
    (small, large)
}

impl LlamaExecutor {
    /// One `llama_decode` of the entries `call` of `batch`, then sampling of its rows;
    /// sampled tokens are appended with their entry's index.
    fn decode_call(
        &mut self,
        batch: &[BatchEntry<'_>],
        call: &[usize],
        out: &mut Vec<(usize, Sampled)>,
    ) -> Result<(), ExecError> {
        self.batch.clear();
        let mut logit_rows = Vec::new();
        for &i in call {
            let e = &batch[i];
            let seq = [e.slot.0 as i32];
            let last = e.tokens.len().saturating_sub(1);
            for (k, t) in e.tokens.iter().enumerate() {
                let want = e.sample && k == last;
                if want {
                    logit_rows.push((i, e.slot, self.batch.n_tokens()));
                }
                self.batch
                    .add(LlamaToken(t.0), (e.pos as usize + k) as i32, &seq, want)
                    .map_err(|err| ExecError::Failed(format!("batch: {err}")))?;
            }
        }
        if self.batch.n_tokens() == 0 {
            return Ok(());
        }
        self.ctx.decode(&mut self.batch).map_err(|e| match e {
            llama_cpp_2::DecodeError::NoKvCacheSlot => ExecError::NoKvSpace,
            other => ExecError::Failed(other.to_string()),
        })?;
        let vocab = self.model.vocab();
        for (i, slot, row) in logit_rows {
            let sampler = self
                .samplers
                .get_mut(slot.0 as usize)
                .and_then(Option::as_mut)
                .ok_or_else(|| ExecError::Failed(format!("slot {} has no sampler", slot.0)))?;
            let t = sampler.sample(&self.ctx, row);
            out.push((
                i,
                Sampled {
                    token: TokenId(t.0),
                    eog: vocab.is_eog(t),
                },
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(slot: u32, tokens: &[TokenId]) -> BatchEntry<'_> {
        BatchEntry {
            slot: SeqSlot(slot),
            pos: 10,
            tokens,
            sample: true,
        }
    }

    #[test]
    fn decodes_and_prefill_chunks_are_split_only_where_the_tiled_kernel_would_mix_them() {
        let one = [TokenId(1)];
        let chunk = [TokenId(2); 55];
        let small = [TokenId(3); 8];
        // 16 decodes + a 55-token chunk: decodes and the small piece together, the chunk alone.
        let mut batch: Vec<BatchEntry> = (0..16).map(|s| entry(s, &one)).collect();
        batch.push(entry(20, &chunk));
        batch.push(entry(21, &small));
        let (a, b) = split_calls(&batch);
        assert_eq!(a, (0..16).chain([17]).collect::<Vec<_>>());
        assert_eq!(b, vec![16]);
        // Below one tile, only decodes, or only chunks: one call.
        assert_eq!(split_calls(&batch[..17]).1, vec![16]);
        assert!(split_calls(&[entry(0, &one), entry(1, &small)])
            .1
            .is_empty());
        let decodes: Vec<BatchEntry> = (0..80).map(|s| entry(s, &one)).collect();
        assert!(split_calls(&decodes).1.is_empty());
        assert!(split_calls(&[entry(0, &chunk), entry(1, &chunk)])
            .1
            .is_empty());
    }
}
