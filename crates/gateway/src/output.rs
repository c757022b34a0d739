//! A generation's tokens → text pieces: UTF-8 reassembly, stop strings, usage counting.

use crate::error::ApiError;
use crate::meter::Meter;
use crate::stop::StopMatcher;
use std::collections::VecDeque;
use std::sync::Arc;
use tokenfab_api::{PromptTokensDetails, Usage};
use tokenfab_engine::{Event, FinishReason, Generation, Tokenizer, Utf8Stream};
use tokenfab_ledger::TokenUsage;
use tokenfab_types::{ErrorCode, Tokens};

/// A request under way: its output, first piece, and held budget and limits.
pub struct Started {
    pub out: TextOutput,
    pub first: Piece,
    pub meter: Meter,
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
    ) -> Self {
        TextOutput {
            generation: Some(generation),
            tokenizer,
            utf8: Utf8Stream::default(),
            stop: StopMatcher::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            pending: VecDeque::new(),
        }
    }

    /// (prompt, completion) tokens so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.prompt_tokens, self.completion_tokens)
    }

    /// The next piece; `None` after `End` or `Error`.
    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(p);
            }
            let generation = self.generation.as_mut()?;
            let event = generation.next().await;
            self.on_event(event);
        }
    }

    fn text(&mut self, t: String) {
        if !t.is_empty() {
            self.pending.push_back(Piece::Text(t));
        }
    }

    /// Stop generating: dropping the generation cancels it in the engine.
    fn close(&mut self) {
        self.generation = None;
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
