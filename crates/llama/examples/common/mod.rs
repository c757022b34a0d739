//! What the timing examples share: the default model from the local cache (`tokenfab
//! pull` fetches it), an executor on the machine's 2 kernel threads, greedy sampling.

use std::sync::Arc;
use tokenfab_engine::SamplingParams;
use tokenfab_llama::{KvLayout, LlamaExecutor, LlamaExecutorConfig, LoadedModel};

pub type Error = Box<dyn std::error::Error>;

pub fn default_model() -> Result<Arc<LoadedModel>, Error> {
    let home = tokenfab_llama::pull::home();
    let pulled = tokenfab_llama::pull::pull(tokenfab_llama::pull::DEFAULT_MODEL, &home)?;
    Ok(LoadedModel::load(&pulled.path, &pulled.name)?)
}

/// An executor of `slots` sequences and `kv_tokens` cells in all, and greedy sampling
/// parameters for its sequences.
pub fn executor(
    model: &LoadedModel,
    kv_tokens: usize,
    layout: KvLayout,
    slots: usize,
) -> Result<(LlamaExecutor, SamplingParams), Error> {
    let cfg = LlamaExecutorConfig {
        kv_tokens: kv_tokens as u32,
        layout,
        slots: slots as u32,
        threads: 2,
        ..LlamaExecutorConfig::default()
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    Ok((LlamaExecutor::new(model, &cfg)?, greedy))
}
