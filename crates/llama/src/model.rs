//! A GGUF model loaded once per process: vocabulary, chat template, weights.

use crate::template::ChatTemplate;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tokenfab_engine::{ChatTurn, Tokenizer};
use tokenfab_types::TokenId;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("llama.cpp backend failed to start: {0}")]
    Backend(String),
    #[error("cannot load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("chat template of {0} is invalid: {1}")]
    Template(String, String),
}

/// llama.cpp's backend is process-global and initialised once.
pub(crate) fn backend() -> Result<&'static LlamaBackend, ModelError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            refuse_amx_build()?;
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ModelError::Backend(e.clone()))
}

/// A ggml compiled with its AMX kernels would put quantized weights in the AMX buffer
/// type on this CPU, and that matmul dies of SIGILL on its first request (ARCHITECTURE.md,
/// build notes). `.cargo/config.toml` builds without them; a target directory built
/// before that keeps the old llama.cpp, because its build script does not rerun when
/// compiler flags change. Refuse to start then, saying how to rebuild, rather than crash.
fn refuse_amx_build() -> Result<(), String> {
    // SAFETY: reads a constant of ggml's build (`#if defined(__AMX_INT8__)`); no state.
    #[allow(unsafe_code)]
    let amx = unsafe { llama_cpp_sys_2::ggml_cpu_has_amx_int8() } != 0;
    if amx {
        return Err(
            "this llama.cpp was built with ggml's AMX kernels, which crash on the \
                    first request; rebuild it without them: `cargo clean -p llama-cpp-sys-2` \
                    (and `--release`), then build again"
                .into(),
        );
    }
    Ok(())
}

/// A model's weights and vocabulary. Loaded once and kept for the life of the process
/// (executors on the engine thread borrow it for `'static`).
pub struct LoadedModel {
    model: &'static LlamaModel,
    name: String,
    template: ChatTemplate,
    add_bos: bool,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .finish()
    }
}

impl LoadedModel {
    /// Load a GGUF file and serve it under `name`.
    pub fn load(path: &Path, name: &str) -> Result<Arc<LoadedModel>, ModelError> {
        let backend = backend()?;
        let load_err = |reason: String| ModelError::Load {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(load_err("no such file".into()));
        }
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| load_err(e.to_string()))?;
        // Leaked on purpose: a served model lives as long as the process, and llama.cpp
        // contexts borrow it.
        let model: &'static LlamaModel = Box::leak(Box::new(model));
        let vocab = model.vocab();
        let piece = |t: LlamaToken| {
            String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
        };
        let source = model.meta_val_str("tokenizer.chat_template").ok();
        let template = ChatTemplate::new(source, piece(vocab.bos()), piece(vocab.eos()))
            .map_err(|e| ModelError::Template(name.to_owned(), e.to_string()))?;
        Ok(Arc::new(LoadedModel {
            add_bos: vocab.should_add_bos(),
            model,
            name: name.to_owned(),
            template,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        self.model.n_ctx_train()
    }

    pub(crate) fn raw(&self) -> &'static LlamaModel {
        self.model
    }
}

impl Tokenizer for LoadedModel {
    fn encode(&self, text: &str) -> Vec<TokenId> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), self.add_bos, true)
            .into_iter()
            .map(|t| TokenId(t.0))
            .collect()
    }

    fn token_bytes(&self, token: TokenId) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token.0), false, None)
    }

    fn render_chat(&self, turns: &[ChatTurn]) -> Result<String, String> {
        self.template.render(turns).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_build_of_ggml_has_no_amx_kernels() {
        // On a CPU with AMX this fails unless `.cargo/config.toml`'s flags reached CMake.
        assert_eq!(super::refuse_amx_build(), Ok(()));
    }
}
