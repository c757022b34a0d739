use crate::engine::EngineError;
use crate::executor::SamplingParams;
use tokenfab_sched::{Band, FinishReason, Slo};
use tokenfab_types::{TenantId, TokenId, Tokens};
use tokio::sync::mpsc;

/// A tokenized generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub tenant: TenantId,
    pub band: Band,
    pub weight: u32,
    pub prompt: Vec<TokenId>,
    pub max_new: Tokens,
    /// `None`: the engine draws a random seed.
    pub seed: Option<u64>,
    pub sampling: SamplingParams,
    pub slo: Slo,
    /// Prefix-cache scope: requests share cached prefixes only within one scope. `None`:
    /// private to the tenant.
    pub cache_scope: Option<String>,
}

/// Token accounting of a finished generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

/// What a generation emits, in order: `Scheduled` (once, when it first runs), tokens,
/// then exactly one `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// The request left the queue: its first step is planned (for the `queue` span).
    Scheduled,
    Token(TokenId),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(EngineError),
}

/// The receiving end of a generation. Dropping it cancels the request: the engine notices
/// before its next step and frees the sequence's KV.
#[derive(Debug)]
pub struct Generation {
    pub(crate) rx: mpsc::UnboundedReceiver<Event>,
}

impl Generation {
    /// The next event; `None` after the final event.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Stop the engine from delivering more, and count the tokens it had already
    /// delivered but nobody read: with those, the caller knows exactly how many tokens the
    /// request was handed.
    pub fn close(&mut self) -> u64 {
        self.rx.close();
        let mut unread = 0;
        while let Ok(ev) = self.rx.try_recv() {
            if matches!(ev, Event::Token(_)) {
                unread += 1;
            }
        }
        unread
    }
}
