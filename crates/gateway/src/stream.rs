//! Server-sent events for streamed completions, in OpenAI's chunk format.

use crate::output::{Piece, Started};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream;
use std::convert::Infallible;
use tokenfab_api::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, Completion, CompletionChoice, Usage,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Chunker {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl Chunker {
    fn json<T: serde::Serialize>(v: &T) -> Event {
        Event::default().data(serde_json::to_string(v).unwrap_or_default())
    }

    fn chunk(&self, delta: ChatDelta, text: Option<String>, finish: Option<&str>) -> Event {
        match self.kind {
            Kind::Chat => Self::json(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta,
                    finish_reason: finish.map(str::to_owned),
                    logprobs: None,
                }],
                usage: self.include_usage.then_some(None),
            }),
            Kind::Text => Self::json(&Completion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    finish_reason: finish.map(str::to_owned),
                    logprobs: None,
                }],
                usage: None,
            }),
        }
    }

    fn text(&self, t: String) -> Event {
        self.chunk(
            ChatDelta {
                role: None,
                content: Some(t.clone()),
            },
            Some(t),
            None,
        )
    }

    fn usage(&self, usage: Usage) -> Event {
        match self.kind {
            Kind::Chat => Self::json(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(Some(usage)),
            }),
            Kind::Text => Self::json(&Completion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage),
            }),
        }
    }
}

enum Phase {
    Start(Piece),
    Next,
    Done,
}

/// Stream a started request as SSE. Its first piece was already read (so errors before
/// the first token were answered with a status instead). Every piece was billed before the
/// output handed it over. Dropping the response body (client gone) drops the output, which
/// cancels the generation in the engine and bills what was served.
pub fn sse(
    kind: Kind,
    id: String,
    model: String,
    include_usage: bool,
    started: Started,
) -> Response {
    let Started { out, first } = started;
    let c = Chunker {
        kind,
        id,
        model,
        created: unix_now(),
        include_usage,
    };
    let mut opening = Vec::new();
    if kind == Kind::Chat {
        opening.push(c.chunk(
            ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
            None,
        ));
    }
    let events = stream::unfold(
        (c, out, Phase::Start(first)),
        |(c, mut out, phase)| async move {
            let piece = match phase {
                Phase::Done => return None,
                Phase::Start(p) => p,
                Phase::Next => out.next().await?,
            };

            let batch: Vec<Event> = match piece {
                Piece::Text(t) => vec![c.text(t)],
                Piece::End {
                    finish_reason,
                    usage,
                } => {
                    let mut v = vec![c.chunk(ChatDelta::default(), None, Some(finish_reason))];
                    if c.include_usage {
                        v.push(c.usage(usage));
                    }
                    v.push(Event::default().data("[DONE]"));
                    return Some((v, (c, out, Phase::Done)));
                }
                // A failure after the stream started: an error event, never a normal end.
                Piece::Error(e) => {
                    let ev = Chunker::json(&e.body());
                    return Some((vec![ev], (c, out, Phase::Done)));
                }
            };
            Some((batch, (c, out, Phase::Next)))
        },
    );
    let flat = futures::StreamExt::flat_map(events, |v| {
        stream::iter(v.into_iter().map(Ok::<_, Infallible>))
    });
    let all = futures::StreamExt::chain(
        stream::iter(opening.into_iter().map(Ok::<_, Infallible>)),
        flat,
    );
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}
