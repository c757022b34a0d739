//! A remote OpenAI-compatible worker: forward a request as a stream, read its events.

use crate::anthropic;
use crate::spec::WorkerSpec;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::time::Duration;

/// Which OpenAI endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// Why a worker did not serve a request, which decides what the router does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Connection refused or reset, a 5xx other than 503, a timeout, a stream cut off or
    /// garbled: the worker's fault. Counts toward ejection; another worker may retry.
    Broken,
    /// 429 or 503: the worker is busy. Another worker may retry; no ejection.
    Busy,
    /// Any other 4xx: the request's fault. Passed to the client as is; no retry.
    Rejected,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("worker {worker}: {message}")]
pub struct WorkerError {
    pub worker: String,
    pub failure: Failure,
    /// The worker's HTTP status, when it answered with one.
    pub status: Option<u16>,
    pub message: String,
}

/// Token counts as the worker reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteUsage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteEvent {
    /// Generated text (one chunk: usually one token).
    Text(String),
    Done {
        finish_reason: String,
        usage: Option<RemoteUsage>,
    },
}

pub struct RemoteWorker {
    pub spec: WorkerSpec,
    pub name: String,
    client: reqwest::Client,
    timeout: Duration,
}

/// A streamed answer's events, or a whole answer already split into events.
enum Source {
    Sse(Events),
    Whole(std::collections::VecDeque<String>),
}

type Events = Pin<
    Box<
        dyn Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// The events of one forwarded request; dropping it closes the connection, which cancels
/// the request on the worker.
pub struct RemoteStream {
    worker: String,
    events: Source,
    idle: Duration,
    finish: Option<String>,
    usage: Option<RemoteUsage>,
    done: bool,
    /// Set when the worker speaks Anthropic's Messages API.
    anthropic: Option<anthropic::Reader>,
}

impl RemoteWorker {
    pub fn new(spec: WorkerSpec, connect_timeout: Duration, timeout: Duration) -> RemoteWorker {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        RemoteWorker {
            name: spec.display_name(),
            spec,
            client,
            timeout,
        }
    }

    fn error(&self, failure: Failure, status: Option<u16>, message: String) -> WorkerError {
        WorkerError {
            worker: self.name.clone(),
            failure,
            status,
            message,
        }
    }

    /// Send `body` (an OpenAI request) with `headers` forwarded and wait for the response
    /// head. `stream`: ask for a stream with usage (text goes out as it comes); else ask
    /// for the whole answer (cheaper for both sides when the client waits for all of it).
    pub async fn send(
        &self,
        endpoint: Endpoint,
        mut body: serde_json::Value,
        headers: &[(String, String)],
        stream: bool,
    ) -> Result<RemoteStream, WorkerError> {
        let messages_api = self.spec.api == "anthropic";
        if messages_api {
            let model = match self.spec.upstream_model.as_str() {
                "" => body["model"].as_str().unwrap_or_default().to_owned(),
                m => m.to_owned(),
            };
            body = anthropic::request(&body, &model, stream);
        } else if let Some(obj) = body.as_object_mut() {
            obj.insert("stream".into(), stream.into());
            if stream {
                obj.insert(
                    "stream_options".into(),
                    serde_json::json!({ "include_usage": true }),
                );
            } else {
                obj.remove("stream_options");
            }
            if !self.spec.upstream_model.is_empty() {
                obj.insert("model".into(), self.spec.upstream_model.clone().into());
            }
        }
        let path = if messages_api {
            "/v1/messages"
        } else {
            endpoint.path()
        };
        let url = format!("{}{}", self.spec.url.trim_end_matches('/'), path);
        let mut req = self.client.post(&url).json(&body);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if messages_api {
            req = req
                .header("x-api-key", &self.spec.api_key)
                .header("anthropic-version", anthropic::VERSION);
        } else if !self.spec.api_key.is_empty() {
            req = req.bearer_auth(&self.spec.api_key);
        }
        let resp = match tokio::time::timeout(self.timeout, req.send()).await {
            Err(_) => return Err(self.error(Failure::Broken, None, "no response in time".into())),
            Ok(Err(e)) => return Err(self.error(Failure::Broken, None, e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let code = status.as_u16();
            let failure = match code {
                429 | 503 | 529 => Failure::Busy,
                400..=499 => Failure::Rejected,
                _ => Failure::Broken,
            };
            let text = resp.text().await.unwrap_or_default();
            return Err(self.error(failure, Some(code), upstream_message(&text, code)));
        }
        let events = if stream {
            Source::Sse(Box::pin(resp.bytes_stream().eventsource()))
        } else {
            // The whole answer is one event in the chunk format's shape.
            let text = match tokio::time::timeout(self.timeout, resp.text()).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(self.error(Failure::Broken, None, e.to_string())),
                Err(_) => {
                    return Err(self.error(Failure::Broken, None, "no answer in time".into()))
                }
            };
            let end = if messages_api {
                r#"{"type":"message_stop"}"#
            } else {
                "[DONE]"
            };
            Source::Whole([text, end.to_owned()].into())
        };
        Ok(RemoteStream {
            worker: self.name.clone(),
            events,
            idle: self.timeout,
            finish: None,
            usage: None,
            done: false,
            anthropic: messages_api.then(anthropic::Reader::default),
        })
    }

    /// The active health check: `GET <url>/health` answers 2xx in time. A tokenfab worker's
    /// answer also says how full its KV cache is (per mille).
    pub async fn check(&self, timeout: Duration) -> Result<Option<u32>, String> {
        let url = format!("{}/health", self.spec.url.trim_end_matches('/'));
        let resp = tokio::time::timeout(timeout, self.client.get(&url).send())
            .await
            .map_err(|_| "health check timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("health check answered {}", resp.status()));
        }
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let used = body
            .get("kv_blocks_used")
            .and_then(serde_json::Value::as_u64);
        let total = body
            .get("kv_blocks_total")
            .and_then(serde_json::Value::as_u64);
        Ok(match (used, total) {
            (Some(u), Some(t)) if t > 0 => Some(u32::try_from(u * 1000 / t).unwrap_or(1000)),
            _ => None,
        })
    }
}

/// The model ids a worker lists at `GET <url>/v1/models` (for workers configured without
/// `models`).
pub async fn list_models(spec: &WorkerSpec, timeout: Duration) -> Result<Vec<String>, String> {
    let url = format!("{}/v1/models", spec.url.trim_end_matches('/'));
    let mut req = reqwest::Client::new().get(&url).timeout(timeout);
    if spec.api == "anthropic" {
        req = req
            .header("x-api-key", &spec.api_key)
            .header("anthropic-version", anthropic::VERSION);
    } else if !spec.api_key.is_empty() {
        req = req.bearer_auth(&spec.api_key);
    }
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    let body: serde_json::Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    let ids: Vec<String> = body
        .get("data")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("id").and_then(serde_json::Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() {
        return Err(format!("{url} lists no models"));
    }
    Ok(ids)
}

/// The message of an OpenAI error body, or the text itself.
fn upstream_message(text: &str, status: u16) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let msg = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    msg.unwrap_or_else(|| {
        let t: String = text.chars().take(200).collect();
        format!("answered {status}: {t}")
    })
}

impl RemoteStream {
    fn broken(&self, message: String) -> WorkerError {
        WorkerError {
            worker: self.worker.clone(),
            failure: Failure::Broken,
            status: None,
            message,
        }
    }

    /// The next event; `None` after `Done` or an error.
    pub async fn next(&mut self) -> Option<Result<RemoteEvent, WorkerError>> {
        while !self.done {
            let next = match &mut self.events {
                Source::Sse(events) => tokio::time::timeout(self.idle, events.next()).await,
                Source::Whole(queue) => Ok(queue.pop_front().map(|data| {
                    Ok(eventsource_stream::Event {
                        data,
                        ..Default::default()
                    })
                })),
            };
            let ev = match next {
                Err(_) => Err(self.broken("the stream stalled".into())),
                Ok(None) if self.finish.is_some() => Ok(None),
                Ok(None) => Err(self.broken("the stream ended before the generation did".into())),
                Ok(Some(Err(e))) => Err(self.broken(format!("the stream broke: {e}"))),
                Ok(Some(Ok(e))) => Ok(Some(e.data)),
            };
            let data = match ev {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(None) => "[DONE]".to_owned(),
                Ok(Some(d)) => d,
            };
            if data.trim() == "[DONE]" {
                self.done = true;
                return Some(match self.finish.take() {
                    Some(finish_reason) => Ok(RemoteEvent::Done {
                        finish_reason,
                        usage: self.usage,
                    }),
                    None => Err(self.broken("the stream ended without a finish reason".into())),
                });
            }
            match self.parse(&data) {
                Ok(Some(ev)) => {
                    self.done = matches!(ev, RemoteEvent::Done { .. });
                    return Some(Ok(ev));
                }
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }

    /// One event: text or the end (if any); remembers finish reason and usage.
    fn parse(&mut self, data: &str) -> Result<Option<RemoteEvent>, WorkerError> {
        let v: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| self.broken(format!("unreadable event: {e}")))?;
        if let Some(reader) = &mut self.anthropic {
            return match reader.read(&v) {
                Ok(ev) => Ok(ev),
                Err(msg) => Err(self.broken(format!("failed mid-stream: {msg}"))),
            };
        }
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("error event");
            return Err(self.broken(format!("failed mid-stream: {msg}")));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |p: &str| {
                u.pointer(p)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            self.usage = Some(RemoteUsage {
                prompt: n("/prompt_tokens"),
                cached: n("/prompt_tokens_details/cached_tokens"),
                completion: n("/completion_tokens"),
            });
        }
        let Some(choice) = v.pointer("/choices/0") else {
            return Ok(None);
        };
        if let Some(f) = choice
            .get("finish_reason")
            .and_then(serde_json::Value::as_str)
        {
            self.finish = Some(f.to_owned());
        }
        let text = choice
            .pointer("/delta/content")
            .or_else(|| choice.pointer("/message/content"))
            .or_else(|| choice.get("text"))
            .and_then(serde_json::Value::as_str)
            .filter(|t| !t.is_empty());
        Ok(text.map(|t| RemoteEvent::Text(t.to_owned())))
    }
}
