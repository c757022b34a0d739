//! Server-sent events for streamed completions, in OpenAI's chunk format.

use crate::idempotency::Claim;
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

/// One SSE event's data, kept as text so an idempotent stream can be stored as sent.
struct Out(String);

impl Out {
    fn event(&self) -> Event {
        Event::default().data(&self.0)
    }

    /// The event as it appears on the wire.
    fn wire(&self) -> String {
        format!("data: {}\n\n", self.0)
    }
}

impl Chunker {
    fn json<T: serde::Serialize>(v: &T) -> Out {
        Out(serde_json::to_string(v).unwrap_or_default())
    }

    fn chunk(&self, delta: ChatDelta, text: Option<String>, finish: Option<&str>) -> Out {
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

    fn text(&self, t: String) -> Out {
        self.chunk(
            ChatDelta {
                role: None,
                content: Some(t.clone()),
            },
            Some(t),
            None,
        )
    }

    fn usage(&self, usage: Usage) -> Out {
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

/// What the stream carries between events.
struct State {
    c: Chunker,
    out: crate::output::TextOutput,
    phase: Phase,
    /// The request's idempotency claim and everything sent so far (stored whole before
    /// the final events go out).
    claim: Option<(Claim, String)>,
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
    claim: Option<Claim>,
) -> Response {
    let Started { out, first, .. } = started;
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
    let claim = claim.map(|cl| (cl, opening.iter().map(Out::wire).collect::<String>()));
    let state = State {
        c,
        out,
        phase: Phase::Start(first),
        claim,
    };
    let events = stream::unfold(state, |mut st| async move {
        let piece = match std::mem::replace(&mut st.phase, Phase::Next) {
            Phase::Done => return None,
            Phase::Start(p) => p,
            Phase::Next => st.out.next().await?,
        };
        let batch: Vec<Out> = match piece {
            Piece::Text(t) => vec![st.c.text(t)],
            Piece::End {
                finish_reason,
                usage,
            } => {
                let mut v = vec![st.c.chunk(ChatDelta::default(), None, Some(finish_reason))];
                if st.c.include_usage {
                    v.push(st.c.usage(usage));
                }
                v.push(Out("[DONE]".into()));
                st.phase = Phase::Done;
                if let Some((claim, mut sent)) = st.claim.take() {
                    sent.extend(v.iter().map(Out::wire));
                    if let Err(e) = claim.complete(sent.as_bytes()).await {
                        // Not stored: say so instead of ending normally (the claim is
                        // released, so a retry runs again).
                        return Some((vec![Chunker::json(&e.body())], st));
                    }
                }
                v
            }
            // A failure after the stream started: an error event, never a normal end.
            Piece::Error(e) => {
                st.phase = Phase::Done;
                vec![Chunker::json(&e.body())]
            }
            // (Not reached: a stream's first piece was text, after which a worker failure
            // is an error.)
            Piece::Retry(e) => {
                st.phase = Phase::Done;
                vec![Chunker::json(&crate::error::ApiError::from(e).body())]
            }
        };
        if let Some((_, sent)) = &mut st.claim {
            sent.extend(batch.iter().map(Out::wire));
        }
        Some((batch, st))
    });
    let flat = futures::StreamExt::flat_map(events, |v| {
        stream::iter(v.into_iter().map(|o| Ok::<_, Infallible>(o.event())))
    });
    let all = futures::StreamExt::chain(
        stream::iter(opening.into_iter().map(|o| Ok::<_, Infallible>(o.event()))),
        flat,
    );
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}
