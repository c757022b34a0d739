//! Admission and metering of one request: authenticate, take rate limits, reserve budget
//! (TRY), and later confirm or cancel exactly once.
//!
//! A [`Meter`] is the request's held resources. Ending it is explicit on the normal and
//! failure paths ([`Meter::finish`], awaited before the response or the stream's final
//! event is released, so the usage row is durable first); when the request is dropped
//! instead (client disconnect), `Drop` settles what was served so far on a tracked task that
//! graceful shutdown waits for. A crash leaves the reservation open with its recorded
//! progress; the next start of the same node resolves it.

use crate::error::ApiError;
use crate::limits::{Limiter, RateInfo};
use crate::metrics::RequestTimer;
use crate::state::AppState;
use std::sync::Arc;
use tokenfab_ledger::{
    AttemptId, KeyRecord, LedgerError, LedgerStore, Outcome, Reservation, Settlement, TokenUsage,
};
use tokenfab_types::{ErrorCode, Tokens};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Rate-limit capacity a request holds until it ends.
struct Held {
    limiter: Arc<Limiter>,
    key: KeyRecord,
    request_id: String,
    tokens: u64,
}

pub struct Meter {
    ledger: Option<(Arc<dyn LedgerStore>, AttemptId)>,
    limit: Option<Held>,
    tracker: TaskTracker,
    usage: TokenUsage,
    ended: bool,
    /// Taken when the request ends (its settlement records the request's metrics).
    timer: Option<RequestTimer>,
    /// For the `x-ratelimit-*` headers of the response.
    pub rate: Option<RateInfo>,
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Take limits and reserve budget for a request of `prompt` tokens and at most
/// `max_completion` new ones, billed as `model`.
pub async fn admit(
    s: &AppState,
    key: Option<&KeyRecord>,
    (request_id, x_request_id): (&str, &str),
    timer: RequestTimer,
    (model, prompt, max_completion): (&str, u64, u64),
) -> Result<Meter, ApiError> {
    let mut meter = Meter {
        ledger: None,
        limit: None,
        tracker: s.tracker.clone(),
        usage: TokenUsage::default(),
        ended: false,
        // Set once admitted: a request refused here is counted by its HTTP status only.
        timer: None,
        rate: None,
    };
    let Some(key) = key else {
        meter.timer = Some(timer);
        return Ok(meter);
    };
    let tokens = prompt + max_completion;
    meter.rate = Some(s.limiter.acquire(key, tokens, request_id).await?);
    meter.limit = Some(Held {
        limiter: s.limiter.clone(),
        key: key.clone(),
        request_id: request_id.to_owned(),
        tokens,
    });
    let r = Reservation {
        id: AttemptId::new(request_id, 0),
        node: s.config.node.clone(),
        key_id: key.id.clone(),
        tenant: key.tenant.clone(),
        model: model.to_owned(),
        prompt: Tokens(prompt),
        max_completion: Tokens(max_completion),
        price: s.config.price_of(model),
        now: unix_now(),
        x_request_id: Some(x_request_id.to_owned()),
    };
    match s.ledger.reserve(&r).await {
        Ok(()) => {
            meter.ledger = Some((s.ledger.clone(), r.id));
            meter.timer = Some(timer);
            Ok(meter)
        }
        Err(LedgerError::InsufficientBudget { needed, remaining }) => {
            let mut e = ApiError::new(
                ErrorCode::InsufficientQuota,
                format!(
                    "You exceeded your current quota: this request may cost up to ${:.9} \
                     and ${:.9} of the key's budget remains.",
                    needed.0 as f64 / 1e9,
                    remaining.0 as f64 / 1e9
                ),
            );
            e.rate = meter.rate.clone().map(Box::new);
            Err(e)
        }
        Err(e) => Err(e.into()),
    }
}

impl Meter {
    /// Record, durably, that `completion` tokens have been generated (before they are
    /// released to the client), so a crash bills them.
    pub async fn progress(&mut self, prompt: u64, completion: u64) -> Result<(), ApiError> {
        self.usage.prompt = Tokens(prompt);
        self.usage.completion = Tokens(completion);
        if let Some((ledger, id)) = &self.ledger {
            ledger.progress(id, self.usage).await?;
        }
        Ok(())
    }

    /// The request left the engine's queue (for its trace's phases).
    pub fn scheduled(&mut self) {
        if let Some(t) = &mut self.timer {
            t.scheduled();
        }
    }

    /// A piece of text is about to be released (for the latency series).
    pub fn piece(&mut self) {
        if let Some(t) = &mut self.timer {
            t.piece();
        }
    }

    /// What was served, without writing it (a dropped request settles it on drop).
    pub fn note_served(&mut self, prompt: u64, completion: u64) {
        self.usage.prompt = Tokens(prompt);
        self.usage.completion = Tokens(completion);
    }

    /// CONFIRM what was served (CANCEL when nothing was). Returns once durable.
    pub async fn finish(&mut self, usage: TokenUsage, outcome: Outcome) -> Result<(), ApiError> {
        self.usage = usage;
        self.ended = true;
        self.release_limits();
        let timer = self.timer.take();
        let mut settled = None;
        if let Some((ledger, id)) = self.ledger.take() {
            let s = Settlement {
                usage,
                outcome,
                now: unix_now(),
            };
            let t0 = std::time::Instant::now();
            let span = timer.as_ref().map(RequestTimer::settle_span);
            let done = ledger
                .settle(&id, s)
                .instrument(span.unwrap_or_else(tracing::Span::none))
                .await?;
            settled = Some((done, t0.elapsed()));
        }
        if let Some(t) = timer {
            t.end(outcome, usage, settled);
        }
        Ok(())
    }

    /// Move the request's held resources (limits, reservation, timer) into a new meter,
    /// to run the request again on another worker; this one is left ended and empty. What
    /// was noted as served is dropped: it never reached the client.
    pub fn take_for_retry(&mut self) -> Meter {
        self.ended = true;
        Meter {
            ledger: self.ledger.take(),
            limit: self.limit.take(),
            tracker: self.tracker.clone(),
            usage: TokenUsage::default(),
            ended: false,
            timer: self.timer.take(),
            rate: self.rate.take(),
        }
    }

    /// Usage recorded so far.
    pub fn usage(&self) -> TokenUsage {
        self.usage
    }

    /// Give back the concurrency slot and the reserved tokens not used: at once when the
    /// counters are local, on a tracked task when they are in Redis.
    fn release_limits(&mut self) {
        let Some(held) = self.limit.take() else {
            return;
        };
        let refund = held
            .tokens
            .saturating_sub(self.usage.prompt.0 + self.usage.completion.0);
        if let Limiter::Local(l) = &*held.limiter {
            l.release(&held.key.id, refund);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.tracker.spawn_on(
                    async move {
                        held.limiter
                            .release(&held.key, &held.request_id, refund)
                            .await
                    },
                    &rt,
                );
            }
            Err(_) => {
                tracing::warn!(key = %held.key.id, "no runtime to release a rate-limit slot; its lease frees it")
            }
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.release_limits();
        let timer = self.timer.take();
        let usage = self.usage;
        let Some((ledger, id)) = self.ledger.take() else {
            if let Some(t) = timer {
                t.end(Outcome::Cancelled, usage, None);
            }
            return;
        };
        let s = Settlement {
            usage,
            outcome: Outcome::Cancelled,
            now: unix_now(),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.tracker.spawn_on(
                    async move {
                        let t0 = std::time::Instant::now();
                        match ledger.settle(&id, s).await {
                            Ok(settled) => {
                                if let Some(t) = timer {
                                    t.end(Outcome::Cancelled, usage, Some((settled, t0.elapsed())));
                                }
                            }
                            Err(e) => {
                                tracing::error!(request = %id.request_id, error = %e, "settling a cancelled request failed; it stays open until the next start recovers it");
                            }
                        }
                    },
                    &rt,
                );
            }
            Err(_) => {
                tracing::error!(request = %id.request_id, "no runtime to settle a cancelled request; the next start recovers it")
            }
        }
    }
}
