//! A generation's tokens → text pieces: UTF-8 reassembly, stop strings, usage counting,
//! and billing: the output owns the request's [`Meter`], so that every piece it hands out
//! has been billed first (progress before text, the settlement before the end), and so
//! that, when it is dropped early, the meter learns exactly how many tokens the engine had
//! handed over (read or not) before it settles them.

use crate::error::ApiError;
use crate::meter::Meter;
use crate::stop::StopMatcher;
use std::collections::VecDeque;
use std::sync::Arc;
use tokenfab_api::{PromptTokensDetails, Usage};
use tokenfab_engine::{Event, FinishReason, Generation, Tokenizer, Utf8Stream};
use tokenfab_ledger::{Outcome, TokenUsage};
use tokenfab_types::{ErrorCode, Tokens};

/// A request under way: its (metered) output and the first piece.
pub struct Started {
    pub out: TextOutput,
    pub first: Piece,
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
}

pub struct TextOutput {
    generation: Option<Generation>,
    tokenizer: Arc<dyn Tokenizer>,
    utf8: Utf8Stream,
    stop: StopMatcher,
    prompt_tokens: u64,
    completion_tokens: u64,
    pending: VecDeque<Piece>,
    meter: Meter,
    /// Streams release text as it comes, so its progress is made durable first; a whole
    /// response releases nothing before the settlement, which covers it.
    streaming: bool,
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
    pub fn new(
        generation: Generation,
        tokenizer: Arc<dyn Tokenizer>,
        stops: Vec<String>,
        prompt_tokens: u64,
        meter: Meter,
        streaming: bool,
    ) -> Self {
        TextOutput {
            generation: Some(generation),
            tokenizer,
            utf8: Utf8Stream::default(),
            stop: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            pending: VecDeque::new(),
            meter,
            streaming,
        }
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The next piece, billed; `None` after `End` or `Error`.
    pub async fn next(&mut self) -> Option<Piece> {
        let piece = self.next_unbilled().await?;
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
            let generation = self.generation.as_mut()?;
            let event = generation.next().await;
            self.on_event(event);
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
        if let Some(mut g) = self.generation.take() {
            self.completion_tokens += g.close();
        }
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Token(t)) => {
                self.completion_tokens += 1;
                let text = self.utf8.push(&self.tokenizer.token_bytes(t));
                let (out, stopped) = self.stop.push(&text);
                self.text(out);
                if stopped {
                    self.close();
                    self.pending.push_back(Piece::End {
                        finish_reason: "stop",
                        usage: usage(self.prompt_tokens, 0, self.completion_tokens),
                    });
                }
            }
            Some(Event::Finished { reason, usage: u }) => {
                self.close();
                let rest = self.utf8.finish();
                let (mut out, stopped) = self.stop.push(&rest);
                if !stopped {
                    out.push_str(&self.stop.finish());
                }
                self.text(out);
                let finish_reason = match reason {
                    FinishReason::Length => "length",
                    FinishReason::Stop | FinishReason::Cancelled => "stop",
                };
                self.pending.push_back(Piece::End {
                    finish_reason,
                    usage: usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens),
                });
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
