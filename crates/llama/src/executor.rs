//! The engine's [`Executor`] on llama.cpp: one context with a unified KV cache shared by
//! all sequence slots; each step is one `llama_decode` over every sequence's tokens.

use crate::model::{backend, LoadedModel, ModelError};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
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
    samplers: Vec<Option<LlamaSampler>>,
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

    /// Logits of the batch position `i` after the last step (for numerics tests).
    pub fn logits(&self, i: i32) -> &[f32] {
        self.ctx.get_logits_ith(i)
    }
}

fn sampler_for(p: &SamplingParams) -> LlamaSampler {
    if p.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    let mut chain = Vec::with_capacity(4);
    if p.top_k > 0 {
        chain.push(LlamaSampler::top_k(p.top_k as i32));
    }
    if p.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(p.top_p, 1));
    }
    chain.push(LlamaSampler::temp(p.temperature));
    // llama.cpp seeds are 32-bit; fold the 64-bit seed so every bit counts.
    let seed = (p.seed ^ (p.seed >> 32)) as u32;
    chain.push(LlamaSampler::dist(seed));
    LlamaSampler::chain_simple(chain)
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
            *s = Some(sampler_for(params));
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
        self.batch.clear();
        let mut logit_rows = Vec::new();
        for e in batch {
            let seq = [e.slot.0 as i32];
            let last = e.tokens.len().saturating_sub(1);
            for (k, t) in e.tokens.iter().enumerate() {
                let want = e.sample && k == last;
                if want {
                    logit_rows.push((e.slot, self.batch.n_tokens()));
                }
                self.batch
                    .add(LlamaToken(t.0), (e.pos as usize + k) as i32, &seq, want)
                    .map_err(|err| ExecError::Failed(format!("batch: {err}")))?;
            }
        }
        if self.batch.n_tokens() == 0 {
            return Ok(Vec::new());
        }
        let t0 = std::time::Instant::now();
        let decoded = self.ctx.decode(&mut self.batch);
        let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
        decoded.map_err(|e| match e {
            llama_cpp_2::DecodeError::NoKvCacheSlot => ExecError::NoKvSpace,
            other => ExecError::Failed(other.to_string()),
        })?;
        let vocab = self.model.vocab();
        let mut out = Vec::with_capacity(logit_rows.len());
        for (slot, row) in logit_rows {
            let sampler = self
                .samplers
                .get_mut(slot.0 as usize)
                .and_then(Option::as_mut)
                .ok_or_else(|| ExecError::Failed(format!("slot {} has no sampler", slot.0)))?;
            let t = sampler.sample(&self.ctx, row);
            out.push(Sampled {
                token: TokenId(t.0),
                eog: vocab.is_eog(t),
            });
        }
        tracing::trace!(
            decode_ms,
            sample_ms = t0.elapsed().as_secs_f64() * 1e3 - decode_ms,
            "llama step"
        );
        Ok(out)
    }
}
