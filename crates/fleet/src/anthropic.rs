//! Anthropic's Messages API, translated both ways: an OpenAI request becomes a Messages
//! request; Messages answers (whole or streamed) become the events the gateway reads.

use crate::remote::{RemoteEvent, RemoteUsage};
use serde_json::{json, Value};

pub const VERSION: &str = "2023-06-01";

/// An OpenAI chat (or completion) request → a Messages request. System and developer
/// messages become `system`; `stop` becomes `stop_sequences`.
pub fn request(openai: &Value, model: &str, stream: bool) -> Value {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    if let Some(msgs) = openai.get("messages").and_then(Value::as_array) {
        for m in msgs {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let text = content_text(m.get("content"));
            match role {
                "system" | "developer" => system.push(text),
                "assistant" => messages.push(json!({"role": "assistant", "content": text})),
                _ => messages.push(json!({"role": "user", "content": text})),
            }
        }
    } else if let Some(p) = openai.get("prompt") {
        let text = match p {
            Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or("").to_owned(),
            other => other.as_str().unwrap_or("").to_owned(),
        };
        messages.push(json!({"role": "user", "content": text}));
    }
    let mut o = serde_json::Map::new();
    o.insert("model".into(), model.into());
    o.insert("messages".into(), Value::Array(messages));
    let max_tokens = openai.get("max_tokens").cloned().unwrap_or(json!(4096));
    o.insert("max_tokens".into(), max_tokens);
    o.insert("stream".into(), stream.into());
    if !system.is_empty() {
        o.insert("system".into(), system.join("\n\n").into());
    }
    for k in ["temperature", "top_p", "top_k"] {
        if let Some(v) = openai.get(k).filter(|v| !v.is_null()) {
            o.insert(k.into(), v.clone());
        }
    }
    match openai.get("stop") {
        Some(Value::String(s)) => {
            o.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            o.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    Value::Object(o)
}

fn content_text(c: Option<&Value>) -> String {
    match c {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn finish(stop_reason: &str) -> String {
    match stop_reason {
        "max_tokens" => "length",
        "refusal" => "content_filter",
        _ => "stop",
    }
    .to_owned()
}

/// What one Messages event (or a whole answer) says, folded into the stream's state.
#[derive(Debug, Default)]
pub struct Reader {
    usage: RemoteUsage,
    finish: Option<String>,
}

impl Reader {
    /// `Ok(Some(event))` to hand on, `Ok(None)` for bookkeeping events, `Err` for an
    /// error event.
    pub fn read(&mut self, v: &Value) -> Result<Option<RemoteEvent>, String> {
        let n = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_u64);
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let m = &v["message"];
                self.usage.prompt = n(m, "/usage/input_tokens").unwrap_or(0)
                    + n(m, "/usage/cache_read_input_tokens").unwrap_or(0);
                self.usage.cached = n(m, "/usage/cache_read_input_tokens").unwrap_or(0);
                Ok(None)
            }
            "content_block_delta" => Ok(v
                .pointer("/delta/text")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(|t| RemoteEvent::Text(t.to_owned()))),
            "message_delta" => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.finish = Some(finish(r));
                }
                if let Some(out) = n(v, "/usage/output_tokens") {
                    self.usage.completion = out;
                }
                Ok(None)
            }
            "message_stop" => Ok(Some(self.done())),
            // A whole (non-streamed) answer: its text, then the end.
            "message" => {
                self.usage = RemoteUsage {
                    prompt: n(v, "/usage/input_tokens").unwrap_or(0)
                        + n(v, "/usage/cache_read_input_tokens").unwrap_or(0),
                    cached: n(v, "/usage/cache_read_input_tokens").unwrap_or(0),
                    completion: n(v, "/usage/output_tokens").unwrap_or(0),
                };
                self.finish = v.get("stop_reason").and_then(Value::as_str).map(finish);
                Ok(Some(RemoteEvent::Text(content_text(v.get("content")))))
            }
            "error" => Err(v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("error event")
                .to_owned()),
            _ => Ok(None), // ping, content_block_start/stop
        }
    }

    /// The end, with the usage the events reported.
    pub fn done(&mut self) -> RemoteEvent {
        RemoteEvent::Done {
            finish_reason: self.finish.take().unwrap_or_else(|| "stop".into()),
            usage: Some(self.usage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_chat_becomes_a_messages_request() {
        let r = request(
            &json!({"model": "x", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}],
                "max_tokens": 9, "temperature": 0.5, "stop": "END"}),
            "claude-x",
            true,
        );
        assert_eq!(r["system"], "Be brief.");
        assert_eq!(r["messages"].as_array().map(Vec::len), Some(3));
        assert_eq!(r["messages"][0], json!({"role": "user", "content": "Hi"}));
        assert_eq!(r["max_tokens"], 9);
        assert_eq!(r["stop_sequences"], json!(["END"]));
        assert_eq!(r["model"], "claude-x");
        assert_eq!(r["stream"], true);
    }

    #[test]
    fn stream_events_become_text_and_an_end_with_usage() {
        let mut rd = Reader::default();
        let evs = [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_read_input_tokens": 4}}}),
            json!({"type": "content_block_start", "index": 0}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hel"}}),
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "lo"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 2}}),
        ];
        let got: Vec<RemoteEvent> = evs
            .iter()
            .filter_map(|e| rd.read(e).expect("no error"))
            .collect();
        assert_eq!(
            got,
            vec![
                RemoteEvent::Text("Hel".into()),
                RemoteEvent::Text("lo".into())
            ]
        );
        let end = rd.read(&json!({"type": "message_stop"})).expect("ok");
        assert_eq!(
            end,
            Some(RemoteEvent::Done {
                finish_reason: "length".into(),
                usage: Some(RemoteUsage {
                    prompt: 14,
                    cached: 4,
                    completion: 2
                }),
            })
        );
        assert!(rd
            .read(&json!({"type": "error", "error": {"message": "overloaded"}}))
            .is_err());
    }
}
