//! A generation's tokens → text pieces: UTF-8 reassembly, stop strings, usage counting,
//! and billing: the output owns the request's [`Meter`], so that every piece it hands out
//! has been billed first (progress before text, the settlement before the end), and so
//! that, when it is dropped early, the meter learns exactly how many tokens the engine had
//! handed over (read or not) before it settles them.
//!
//! The tokens come from this process's engine (token ids, decoded here) or from a remote
//! worker (text chunks; the worker decoded them). A remote failure before anything reached
//! the client is a [`Piece::Retry`]: the caller may send the request to another worker.

use crate::error::ApiError;
use crate::meter::Meter;
use crate::stop::StopMatcher;
use std::collections::VecDeque;
use std::sync::Arc;
use tokenfab_api::{PromptTokensDetails, Usage};
use tokenfab_engine::{Event, FinishReason, Generation, Tokenizer, Utf8Stream};
use tokenfab_fleet::{Failure, Lease, RemoteEvent, RemoteStream, WorkerError};
use tokenfab_ledger::{Outcome, TokenUsage};
use tokenfab_types::{ErrorCode, Tokens};

/// A request under way: its (metered) output and the first piece.
pub struct Started {
    pub out: TextOutput,
    pub first: Piece,
    /// The fleet worker serving it (for `x-tokenfab-worker`), when a fleet routes.
    pub worker: Option<String>,
}

/// The ledger's view of an OpenAI usage block.
pub fn usage_of(u: &Usage) -> TokenUsage {
    TokenUsage {
        prompt: Tokens(u.prompt_tokens),
        cached: Tokens(u.prompt_tokens_details.cached_tokens),
        completion: Tokens(u.completion_tokens),
    }
}

#[derive(Debug)]
pub enum Piece {
    Text(String),
    End {
        finish_reason: &'static str,
        usage: Usage,
    },
    Error(ApiError),
    /// The worker failed before anything reached the client: nothing is billed, and the
    /// request may run again elsewhere (see [`TextOutput::take_meter`]).
    Retry(WorkerError),
}

/// Where the tokens come from.
enum Source {
    Engine {
        generation: Generation,
        tokenizer: Arc<dyn Tokenizer>,
        utf8: Utf8Stream,
    },
    Remote(RemoteStream),
}

pub struct TextOutput {
    source: Option<Source>,
    stop: StopMatcher,
    prompt_tokens: u64,
    completion_tokens: u64,
    pending: VecDeque<Piece>,
    meter: Meter,
    /// Streams release text as it comes, so its progress is made durable first; a whole
    /// response releases nothing before the settlement, which covers it.
    streaming: bool,
    /// Text has gone out on a stream: a failure can no longer be retried elsewhere.
    released: bool,
    /// The fleet worker's claim, when a fleet routed the request.
    lease: Option<Lease>,
}

fn usage(prompt: u64, cached: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

impl TextOutput {
    /// The output of this process's engine.
    pub fn engine(
        generation: Generation,
        tokenizer: Arc<dyn Tokenizer>,
        stops: Vec<String>,
        prompt_tokens: u64,
        meter: Meter,
        streaming: bool,
    ) -> Self {
        let source = Source::Engine {
            generation,
            tokenizer,
            utf8: Utf8Stream::default(),
        };
        Self::new(source, stops, prompt_tokens, meter, streaming)
    }

    /// The output of a remote worker; `prompt_tokens` is the gateway's estimate until the
    /// worker reports its count.
    pub fn remote(
        stream: RemoteStream,
        stops: Vec<String>,
        prompt_tokens: u64,
        mut meter: Meter,
        streaming: bool,
    ) -> Self {
        // The worker has it: its own trace (continued through `traceparent`) shows its
        // queueing; here the request is past the gateway's queue.
        meter.scheduled();
        Self::new(
            Source::Remote(stream),
            stops,
            prompt_tokens,
            meter,
            streaming,
        )
    }

    fn new(
        source: Source,
        stops: Vec<String>,
        prompt_tokens: u64,
        meter: Meter,
        streaming: bool,
    ) -> Self {
        TextOutput {
            source: Some(source),
            stop: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            pending: VecDeque::new(),
            meter,
            streaming,
            released: false,
            lease: None,
        }
    }

    pub fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// After a [`Piece::Retry`]: the request's meter, to run it again elsewhere. What this
    /// worker produced never reached the client and is not billed.
    pub fn take_meter(mut self) -> Meter {
        self.close();
        self.completion_tokens = 0;
        self.meter.take_for_retry()
    }

    /// The next piece, billed; `None` after `End` or `Error`.
    pub async fn next(&mut self) -> Option<Piece> {
        let piece = self.next_unbilled().await?;
        if self.streaming && matches!(piece, Piece::Text(_)) {
            self.released = true;
        }
        Some(match self.bill(&piece).await {
            Ok(()) => piece,
            Err(e) => {
                self.close();
                self.pending.clear();
                Piece::Error(e)
            }
        })
    }

    async fn next_unbilled(&mut self) -> Option<Piece> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(p);
            }
            match self.source.as_mut()? {
                Source::Engine { generation, .. } => {
                    let event = generation.next().await;
                    self.on_event(event);
                }
                Source::Remote(stream) => {
                    let event = stream.next().await;
                    self.on_remote(event);
                }
            }
        }
    }

    /// The ledger holds what a piece bills before the piece is released.
    async fn bill(&mut self, piece: &Piece) -> Result<(), ApiError> {
        let (prompt, completion) = (self.prompt_tokens, self.completion_tokens);
        if let Piece::Text(_) = piece {
            self.meter.piece();
        }
        match piece {
            Piece::Text(_) if self.streaming => self.meter.progress(prompt, completion).await,
            Piece::Text(_) => {
                self.meter.note_served(prompt, completion);
                Ok(())
            }
            Piece::End { usage, .. } => {
                self.meter.finish(usage_of(usage), Outcome::Completed).await
            }
            Piece::Retry(_) => Ok(()),
            Piece::Error(_) => {
                // Tokens handed over before the failure are billed.
                let served = if completion > 0 {
                    TokenUsage {
                        prompt: Tokens(prompt),
                        cached: Tokens(0),
                        completion: Tokens(completion),
                    }
                } else {
                    TokenUsage::default()
                };
                self.meter.finish(served, Outcome::Failed).await
            }
        }
    }

    fn text(&mut self, t: String) {
        if !t.is_empty() {
            self.pending.push_back(Piece::Text(t));
        }
    }

    /// Stop generating (dropping the generation cancels it in the engine), counting the
    /// tokens the engine had already handed over.
    fn close(&mut self) {
        if let Some(Source::Engine { mut generation, .. }) = self.source.take() {
            self.completion_tokens += generation.close();
        }
    }

    /// A token was generated (for the worker's load as the router sees it).
    fn count_token(&mut self) {
        self.completion_tokens += 1;
        if let Some(l) = &mut self.lease {
            l.token();
        }
    }

    /// Text after the stop matcher; `true` when a stop string ended the generation.
    fn emit(&mut self, text: &str) -> bool {
        let (out, stopped) = self.stop.push(text);
        self.text(out);
        if stopped {
            self.close();
            self.pending.push_back(Piece::End {
                finish_reason: "stop",
                usage: usage(self.prompt_tokens, 0, self.completion_tokens),
            });
        }
        stopped
    }

    /// Flush what the stop matcher held back, then end.
    fn end(&mut self, rest: &str, finish_reason: &'static str, u: Usage) {
        self.close();
        let (mut out, stopped) = self.stop.push(rest);
        if !stopped {
            out.push_str(&self.stop.finish());
        }
        self.text(out);
        self.pending.push_back(Piece::End {
            finish_reason,
            usage: u,
        });
    }

    fn on_remote(&mut self, event: Option<Result<RemoteEvent, WorkerError>>) {
        match event {
            Some(Ok(RemoteEvent::Text(t))) => {
                self.count_token();
                self.emit(&t);
            }
            Some(Ok(RemoteEvent::Done {
                finish_reason,
                usage: reported,
            })) => {
                let u = match reported {
                    Some(r) => {
                        self.prompt_tokens = r.prompt;
                        usage(r.prompt, r.cached, r.completion.max(self.completion_tokens))
                    }
                    None => usage(self.prompt_tokens, 0, self.completion_tokens),
                };
                let reason = match finish_reason.as_str() {
                    "length" => "length",
                    "content_filter" => "content_filter",
                    _ => "stop",
                };
                self.end("", reason, u);
            }
            Some(Err(e)) => {
                if let Some(l) = &mut self.lease {
                    l.fail(&e);
                }
                self.close();
                self.source = None;
                let piece = if e.failure != Failure::Rejected && !self.released {
                    Piece::Retry(e)
                } else {
                    Piece::Error(e.into())
                };
                self.pending.push_back(piece);
            }
            None => {
                self.source = None;
                self.pending.push_back(Piece::Error(ApiError::new(
                    ErrorCode::UpstreamFailed,
                    "the worker's stream ended early",
                )));
            }
        }
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Scheduled) => self.meter.scheduled(),
            Some(Event::Token(t)) => {
                self.count_token();
                let text = match &mut self.source {
                    Some(Source::Engine {
                        tokenizer, utf8, ..
                    }) => utf8.push(&tokenizer.token_bytes(t)),
                    _ => String::new(),
                };
                self.emit(&text);
            }
            Some(Event::Finished { reason, usage: u }) => {
                let rest = match &mut self.source {
                    Some(Source::Engine { utf8, .. }) => utf8.finish(),
                    _ => String::new(),
                };
                let finish_reason = match reason {
                    FinishReason::Length => "length",
                    FinishReason::Stop | FinishReason::Cancelled => "stop",
                };
                let u = usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens);
                self.end(&rest, finish_reason, u);
            }
            Some(Event::Failed(e)) => {
                self.close();
                self.pending.push_back(Piece::Error(e.into()));
            }
            None => {
                self.close();
                self.pending.push_back(Piece::Error(ApiError::new(
                    ErrorCode::Internal,
                    "the engine stopped before the generation finished",
                )));
            }
        }
    }
}

impl Drop for TextOutput {
    /// Dropped before the end (client gone): tell the meter exactly what was handed over,
    /// so the settlement its own drop makes bills that.
    fn drop(&mut self) {
        self.close();
        if self.completion_tokens > 0 {
            self.meter
                .note_served(self.prompt_tokens, self.completion_tokens);
        }
    }
}
