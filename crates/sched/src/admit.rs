//! Admission: a bounded queue (in requests and in tokens), early rejection of requests
//! whose TTFT target cannot be met, and shedding of the lowest bands under overload.

use crate::request::SchedRequest;
use crate::scheduler::Scheduler;
use tokenfab_types::{Nanos, RequestId, Tokens};

/// Why a request was not admitted. Every variant says when trying again makes sense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// prompt + max_new exceeds what one sequence can ever hold.
    TooLong { limit: Tokens, requested: Tokens },
    /// The prompt alone reaches the tenant's KV cap (see `KvQuota`).
    OverKvQuota { limit: Tokens, prompt: Tokens },
    /// The prompt is empty.
    EmptyPrompt,
    /// The bounded queue is full (or the request was shed for a higher band).
    QueueFull { retry_after: Nanos },
    /// The predicted time to first token exceeds the request's TTFT target.
    SloUnattainable {
        predicted_ttft: Nanos,
        retry_after: Nanos,
    },
    /// The scheduler is draining for shutdown.
    Draining,
}

impl Scheduler {
    /// Checks that can fail before the queue is even looked at.
    pub(crate) fn validate(&self, req: &SchedRequest) -> Result<(), Rejection> {
        if req.prompt.0 == 0 {
            return Err(Rejection::EmptyPrompt);
        }
        let requested = req.prompt + req.max_new;
        let limit = Tokens(
            self.config()
                .max_seq_tokens
                .min(u64::from(self.blocks().total()) * u64::from(self.blocks().block_tokens())),
        );
        if requested > limit {
            return Err(Rejection::TooLong { limit, requested });
        }
        Ok(())
    }

    /// Predicted time until `req` gets its first token: the prefill work queued ahead of it
    /// (same or higher band) plus its own prompt, less what the prefix cache holds of
    /// each, at the measured prefill rate. Counting cached prompts in full would refuse
    /// exactly the requests a prefix-aware router sends where they are cheap.
    pub(crate) fn predict_ttft(&self, req: &SchedRequest) -> Option<Nanos> {
        let rate = self.prefill_tokens_per_sec()?;
        let ahead: u64 = self
            .queue()
            .iter()
            .filter(|w| w.req.band <= req.band)
            .map(|w| (w.req.prompt.0 + w.generated.0).saturating_sub(w.cached))
            .sum::<u64>()
            + self.running_prefill_backlog();
        let tokens = ahead + req.prompt.0.saturating_sub(self.cached_prompt_tokens(req));
        Some(Nanos::from_secs_f64(tokens as f64 / rate))
    }

    /// Prompt tokens of `req` the prefix cache holds now (at most all but the last).
    pub(crate) fn cached_prompt_tokens(&self, req: &SchedRequest) -> u64 {
        let hit = self.blocks().cached_len(&req.block_hashes) as u64;
        (hit * u64::from(self.blocks().block_tokens())).min(req.prompt.0.saturating_sub(1))
    }

    /// How long until the queue has likely drained enough to take `extra` tokens.
    pub(crate) fn retry_after(&self, extra: u64) -> Nanos {
        let rate = self.prefill_tokens_per_sec().unwrap_or(100.0);
        let secs = (self.queue().tokens() + extra) as f64 / rate;
        Nanos::from_secs_f64(secs.clamp(1.0, 600.0))
    }

    /// Whether the queue has room for `req` without shedding.
    pub(crate) fn has_room(&self, req: &SchedRequest) -> bool {
        let c = self.config();
        (self.queue().len() as u64) < u64::from(c.max_waiting)
            && self.queue().tokens() + req.prompt.0 <= c.max_waiting_tokens
    }

    /// Pick requests of lower bands to shed until `req` fits; `None` when it cannot fit.
    pub(crate) fn shed_plan(&self, req: &SchedRequest) -> Option<Vec<RequestId>> {
        let c = self.config();
        let mut len = self.queue().len() as u64;
        let mut tokens = self.queue().tokens();
        let mut victims = Vec::new();
        let mut candidates: Vec<_> = self
            .queue()
            .iter()
            .filter(|w| w.req.band > req.band)
            .map(|w| {
                (
                    std::cmp::Reverse(w.req.band),
                    std::cmp::Reverse(w.seq_no),
                    w,
                )
            })
            .collect();
        candidates.sort_by_key(|c| (c.0, c.1));
        for (_, _, w) in candidates {
            if len < u64::from(c.max_waiting) && tokens + req.prompt.0 <= c.max_waiting_tokens {
                break;
            }
            len -= 1;
            tokens -= w.req.prompt.0 + w.generated.0;
            victims.push(w.req.id);
        }
        (len < u64::from(c.max_waiting) && tokens + req.prompt.0 <= c.max_waiting_tokens)
            .then_some(victims)
    }
}
