//! The engine's [`Executor`] on llama.cpp: one context whose KV cells are laid out per
//! [`KvLayout`]; each step is one or two `llama_decode` calls over every sequence's tokens
//! (see [`split_calls`]).

use crate::lazy_kv::{created_lazily, KvPages};
use crate::model::{backend, LoadedModel, ModelError};
use crate::sample::Sampler;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU32;
use tokenfab_engine::{BatchEntry, ExecError, Executor, ExecutorCapacity, Sampled, SamplingParams};
use tokenfab_types::{SeqSlot, TokenId};

/// How the KV cells are laid out across sequence slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvLayout {
    /// One pool shared by every slot (llama.cpp `kv_unified`): memory follows what the
    /// sequences really hold, and a cached prefix is shared by tagging its cells, no copy.
    /// The cost: CPU flash attention walks every occupied cell of the pool for each row
    /// of a batch, skipping other sequences' cells one by one — ~0.25 µs per row per
    /// 1,000 cells here, ~10 ms of a ~70 ms step at 16 decodes of ~150 tokens.
    #[default]
    Unified,
    /// A fixed stream of `kv_tokens / slots` cells per slot (llama-server's layout with
    /// `-np`): attention reads only the sequence's own stream, so batched decode runs at
    /// the kernel limit. Every slot reserves room for the longest sequence, which is also
    /// `kv_tokens / slots`, and a cached prefix is reused by copying the source
    /// sequence's saved state (only the cells it holds), then dropping the rest. `serve`'s
    /// default (`config.rs`).
    PerSequence,
}

impl std::str::FromStr for KvLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unified" => Ok(KvLayout::Unified),
            "per-sequence" => Ok(KvLayout::PerSequence),
            other => Err(format!(
                "unknown KV layout `{other}` (expected `unified` or `per-sequence`)"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaExecutorConfig {
    /// KV cells of all sequences together.
    pub kv_tokens: u32,
    pub layout: KvLayout,
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
            layout: KvLayout::Unified,
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
    layout: KvLayout,
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
            .with_kv_unified(cfg.layout == KvLayout::Unified)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let (ctx, kv_pages) = created_lazily(
            || raw.new_context(backend, params),
            |ctx| match ctx {
                Ok(ctx) => kv_buffer_bytes(raw, ctx.n_ctx()),
                Err(_) => 0,
            },
        );
        let ctx = ctx.map_err(|e| ModelError::Load {
            path: model.name().to_owned(),
            reason: format!("context: {e}"),
        })?;
        match kv_pages {
            KvPages::Released(bytes) => tracing::debug!(
                mib = bytes >> 20,
                "KV buffer's zero pages returned to the kernel; they come back as cells fill"
            ),
            other => tracing::info!(reason = ?other, "KV buffer stays resident"),
        }
        let kv = u64::from(ctx.n_ctx());
        let slots = cfg.slots.max(1);
        let seq_cells = match cfg.layout {
            KvLayout::Unified => kv,
            // llama.cpp rounds each stream up to 256 cells and `n_ctx` to the streams' sum.
            KvLayout::PerSequence => kv / u64::from(slots),
        };
        let capacity = ExecutorCapacity {
            slots,
            kv_tokens: kv,
            max_seq_tokens: seq_cells.min(u64::from(raw.n_ctx_train())),
            max_batch_tokens: ctx.n_batch(),
            stream_per_slot: cfg.layout == KvLayout::PerSequence,
            fast_prefill_rows: FA_TILE_ROWS as u32,
        };
        Ok(LlamaExecutor {
            batch: LlamaBatch::new(ctx.n_batch() as usize, 1),
            ctx,
            samplers: (0..capacity.slots).map(|_| None).collect(),
            model: raw,
            capacity,
            layout: cfg.layout,
        })
    }

    /// Logits of position `i` of the last `llama_decode` call (the step's last; for
    /// numerics tests, whose single-sequence steps are one call).
    pub fn logits(&self, i: i32) -> &[f32] {
        self.ctx.get_logits_ith(i)
    }
}

/// Bytes of llama.cpp's KV buffer for `cells` cells: K and V in f16 (the context's
/// default types), `n_head_kv` heads of `n_embd / n_head` each, in every layer. Models
/// whose layers differ (sliding-window caches, other head sizes) do not match it, and
/// then their buffer simply stays resident.
fn kv_buffer_bytes(model: &llama_cpp_2::model::LlamaModel, cells: u32) -> usize {
    let head_dim = (model.n_embd().max(0) as usize) / (model.n_head().max(1) as usize);
    let per_cell = 2 * 2 * head_dim * model.n_head_kv() as usize * model.n_layer() as usize;
    per_cell * cells as usize
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
        if let Some(s) = self.samplers.get_mut(slot.0 as usize) {
            *s = Some(Sampler::new(params));
        }
    }

    fn copy_prefix(&mut self, from: SeqSlot, to: SeqSlot, tokens: u64) {
        let end = u32::try_from(tokens).unwrap_or(u32::MAX);
        let (from_seq, to_seq) = (from.0 as i32, to.0 as i32);
        match self.layout {
            KvLayout::Unified => {
                let _ = self
                    .ctx
                    .kv_cache_seq_cp(from_seq, to_seq, Some(0), Some(end));
            }
            KvLayout::PerSequence => {
                // llama.cpp copies across streams only whole (`seq_cp` of a part aborts),
                // and a whole stream is every cell of the slot: 94 MB of the default
                // model's 4,096-cell streams, written into fresh pages. That cost ~50 ms
                // of a ~210 ms first step at one request at a time on an AMD EPYC here.
                // The source's own state holds only the cells it uses (all of them: no
                // partial state exists), so copy that, then drop what follows the
                // prefix. The K/V bytes and positions are the source's, so the first
                // token's logits stay bit-equal to a cold run in the same pieces
                // (`cli/tests/prefix_cache.rs`, per-sequence case).
                let copied = self
                    .ctx
                    .state_seq_get(from_seq, LlamaStateSeqFlags::empty())
                    .and_then(|state| self.ctx.state_seq_set(&state, to_seq));
                if let Err(e) = copied {
                    tracing::warn!(error = %e, from = from.0, to = to.0,
                        "sequence state copy failed; copying the whole stream");
                    let _ = self.ctx.clear_kv_cache_seq(Some(to.0), None, None);
                    let _ = self.ctx.kv_cache_seq_cp(from_seq, to_seq, None, None);
                }
                let _ = self.ctx.clear_kv_cache_seq(Some(to.0), Some(end), None);
            }
        }
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
            // (slot, position, tokens) per entry: a gap between slots costs a weight
            // pass, and the positions give the attention work.
            slots = ?batch.iter().map(|e| (e.slot.0, e.pos, e.tokens.len())).collect::<Vec<_>>(),
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
///
/// Each call lists its entries in slot order: with one stream per slot, llama.cpp
/// computes a run of consecutive slots in one micro-batch and starts a new one at every
/// gap.
fn split_calls(batch: &[BatchEntry<'_>]) -> (Vec<usize>, Vec<usize>) {
    let by_slot = |i: &usize| batch[*i].slot.0;
    let total: usize = batch.iter().map(|e| e.tokens.len()).sum();
    let mut all: Vec<usize> = (0..batch.len()).collect();
    let pieces = batch.iter().filter(|e| e.tokens.len() > 1).count();
    if total < FA_TILE_ROWS || pieces == 0 || pieces == batch.len() {
        all.sort_unstable_by_key(by_slot);
        return (all, Vec::new());
    }
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut small_tokens = 0;
    // Decodes first (they are why the split pays), then the shortest pieces.
    all.sort_by_key(|&i| batch[i].tokens.len());
    for i in all {
        let n = batch[i].tokens.len();
        if small_tokens + n < FA_TILE_ROWS {
            small_tokens += n;
            small.push(i);
        } else {
            large.push(i);
        }
    }
    small.sort_unstable_by_key(by_slot);
    large.sort_unstable_by_key(by_slot);
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
