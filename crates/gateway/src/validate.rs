//! Request validation: OpenAI request bodies → a checked [`Spec`], or a 400 naming the
//! offending parameter.

use crate::error::ApiError;
use crate::state::AppState;
use tokenfab_api::{
    ChatCompletionRequest, CompletionRequest, Extra, MessageContent, PromptSpec, SamplingFields,
};
use tokenfab_engine::{ChatTurn, SamplingParams};

/// What to generate, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// `None`: as many as the context allows.
    pub max_tokens: Option<u64>,
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

const MAX_STOPS: usize = 4;

/// Fields we do not implement and will not silently ignore when set to a non-default.
fn reject_unsupported(extra: &Extra) -> Result<(), ApiError> {
    for (name, value) in extra {
        let harmless = match name.as_str() {
            "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
            "logprobs" | "echo" | "parallel_tool_calls" => {
                value.is_null() || value.as_bool() == Some(false)
            }
            "tools" | "functions" | "logit_bias" => {
                value.is_null()
                    || value.as_array().is_some_and(Vec::is_empty)
                    || value.as_object().is_some_and(|o| o.is_empty())
            }
            "tool_choice" | "function_call" => value.is_null() || value.as_str() == Some("none"),
            "response_format" => {
                value.is_null() || value.get("type").and_then(|t| t.as_str()) == Some("text")
            }
            "top_logprobs" => value.is_null() || value.as_u64() == Some(0),
            "best_of" => value.is_null() || value.as_u64() == Some(1),
            // Anything else (metadata, store, user, ...) does not change the output.
            _ => true,
        };
        if !harmless {
            return Err(ApiError::invalid(
                name,
                format!("'{name}' with this value is not supported by this server"),
            ));
        }
    }
    Ok(())
}

fn sampling(f: &SamplingFields) -> Result<Spec, ApiError> {
    if let Some(n) = f.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n} is not supported: this server returns exactly one choice per request (n = 1)"),
            ));
        }
    }
    let max_tokens = match (f.max_completion_tokens, f.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    if let Some((m, name)) = max_tokens {
        if m == 0 {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be at least 1"),
            ));
        }
    }
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) || temperature.is_nan() {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = f.top_k.unwrap_or(0);
    if top_k < 0 || top_k > i64::from(i32::MAX) {
        return Err(ApiError::invalid(
            "top_k",
            "top_k must be 0 (off) or a positive integer",
        ));
    }
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop sequences are allowed"),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(Spec {
        max_tokens: max_tokens.map(|(m, _)| m),
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k: top_k as u32,
            seed: 0,
            ignore_eos: f.ignore_eos.unwrap_or(false),
        },
        seed: f.seed.map(|s| s as u64),
        stop,
        stream: f.stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn check_model(requested: &str, s: &AppState) -> Result<(), ApiError> {
    if s.serves(requested) {
        return Ok(());
    }
    let served = s.served().join("', '");
    let mut e = ApiError::new(
        tokenfab_types::ErrorCode::ModelNotFound,
        format!("The model '{requested}' does not exist. This server serves '{served}'."),
    );
    e.param = Some("model".into());
    Err(e)
}

/// A chat request → the conversation and what to generate.
pub fn chat(
    req: &ChatCompletionRequest,
    served: &AppState,
) -> Result<(Vec<ChatTurn>, Spec), ApiError> {
    check_model(&req.model, served)?;
    reject_unsupported(&req.extra)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut turns = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("unsupported role '{other}': use system, developer, user or assistant"),
                ))
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                "content part of type '{}' is not supported; only text parts are",
                                p.kind
                            ),
                            ))
                        }
                    }
                }
                text
            }
        };
        turns.push(ChatTurn {
            role: role.to_owned(),
            content,
        });
    }
    Ok((turns, sampling(&req.sampling)?))
}

/// A text-completion request → the prompt and what to generate. OpenAI's default
/// `max_tokens` for completions is 16.
pub fn completion(req: &CompletionRequest, served: &AppState) -> Result<(String, Spec), ApiError> {
    check_model(&req.model, served)?;
    reject_unsupported(&req.extra)?;
    let prompt = match &req.prompt {
        PromptSpec::One(p) => p.clone(),
        PromptSpec::Many(v) if v.len() == 1 => v[0].clone(),
        PromptSpec::Many(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "a list of {} prompts is not supported; send one prompt per request",
                    v.len()
                ),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    let mut spec = sampling(&req.sampling)?;
    spec.max_tokens = spec.max_tokens.or(Some(16));
    Ok((prompt, spec))
}
