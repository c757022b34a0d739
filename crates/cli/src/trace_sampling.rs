//! Head sampling for trace export. The OpenTelemetry layer costs ~20 µs of gateway CPU per
//! request (building, recording and exporting its 6 spans) even when the SDK's sampler
//! then drops the trace, because the layer does its work before the SDK is asked. So the
//! decision is made first, when the request arrives: a traced request's spans are created
//! under the `tokenfab_gateway::traced` target and an untraced one's under
//! `tokenfab_gateway::untraced`, which the OpenTelemetry layer's filter never enables
//! (see `tokenfab_gateway::trace`), so an untraced request costs it nothing.
//!
//! The decision (`tokenfab_gateway::trace::set_sampler`): a client's W3C `traceparent`
//! decides for its request by its sampled flag (parent-based, as OpenTelemetry's default
//! sampler); otherwise `observability.trace_sample_ratio` of requests are traced, evenly
//! spread (a counter, not a coin: exactly that share, and reproducible). Either way at
//! most `observability.trace_max_per_second` traces start per second (a budget per
//! wall-clock second, like X-Ray's reservoir or Jaeger's rate-limiting sampler): with the
//! defaults every request is traced at low traffic, and at tens of thousands of requests
//! per second tracing costs the gateway a fixed ~2 ms of CPU per second, not a third of
//! it. The budget applies to client-sampled requests too: an upstream service sampling
//! everything must not be able to take that third.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static RATIO: OnceLock<f64> = OnceLock::new();
static SEEN: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();
static BUDGET: Budget = Budget::new();

/// Traces allowed per wall-clock second.
struct Budget {
    /// Per second; 0: no limit.
    max: AtomicU64,
    /// The second (since `EPOCH`) `started` counts in.
    second: AtomicU64,
    started: AtomicU64,
}

impl Budget {
    const fn new() -> Self {
        Budget {
            max: AtomicU64::new(0),
            second: AtomicU64::new(0),
            started: AtomicU64::new(0),
        }
    }

    /// Count a trace against the current second's budget; `false` when it is spent.
    /// `now` (the second) is only read when there is a limit.
    fn take(&self, now: impl FnOnce() -> u64) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            return true;
        }
        let now = now();
        let second = self.second.load(Ordering::Acquire);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The first request of a new second opens its budget (one of the old second
            // counted in between makes the new budget one smaller: harmless).
            self.started.store(0, Ordering::Release);
        }
        self.started.fetch_add(1, Ordering::AcqRel) < max
    }
}

/// Set the share of requests traced when the client says nothing, and the most traces
/// started per second (0: no limit), once per process.
pub fn configure(ratio: f64, max_per_second: u64) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&ratio) {
        anyhow::bail!("observability.trace_sample_ratio = {ratio}: a share is between 0 and 1");
    }
    let _ = RATIO.set(ratio);
    BUDGET.max.store(max_per_second, Ordering::Relaxed);
    Ok(())
}

/// The sampled flag of a W3C `traceparent` (`00-<trace>-<span>-<flags>`), if well formed.
fn parent_sampled(v: &str) -> Option<bool> {
    let mut parts = v.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ok = version.len() == 2 && trace.len() == 32 && span.len() == 16 && flags.len() == 2;
    ok.then(|| u8::from_str_radix(flags, 16).ok().map(|f| f & 1 == 1))?
}

/// Whether the request with these headers is traced.
pub fn sample(headers: &axum::http::HeaderMap) -> bool {
    let parent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let wanted = match parent.and_then(parent_sampled) {
        Some(sampled) => sampled,
        None => {
            let ratio = RATIO.get().copied().unwrap_or(1.0);
            ratio >= 1.0 || nth_traced(SEEN.fetch_add(1, Ordering::Relaxed), ratio)
        }
    };
    wanted && BUDGET.take(|| EPOCH.get_or_init(Instant::now).elapsed().as_secs())
}

/// The n-th request is traced when it carries ⌊n·ratio⌋ past a whole number.
fn nth_traced(n: u64, ratio: f64) -> bool {
    let n = n as f64;
    ((n + 1.0) * ratio).floor() > (n * ratio).floor()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_decides_by_its_sampled_flag() {
        let id = "00-5bf92f3577b34da6a3ce929d0e0e4737-10f067aa0ba902b8";
        assert_eq!(parent_sampled(&format!("{id}-01")), Some(true));
        assert_eq!(parent_sampled(&format!("{id}-00")), Some(false));
        assert_eq!(parent_sampled(&format!("{id}-zz")), None);
        assert_eq!(parent_sampled("00-abc-def-01"), None);
        assert_eq!(parent_sampled(""), None);
    }

    #[test]
    fn a_ratio_traces_exactly_its_share_evenly() {
        let traced: Vec<u64> = (0..1000).filter(|&n| nth_traced(n, 0.05)).collect();
        assert_eq!(traced.len(), 50);
        assert!(traced.windows(2).all(|w| w[1] - w[0] == 20), "{traced:?}");
        assert_eq!((0..1000).filter(|&n| nth_traced(n, 0.0)).count(), 0);
    }

    #[test]
    fn the_budget_allows_its_traces_per_second_and_opens_again_the_next() {
        let b = Budget::new();
        assert!((0..10).all(|_| b.take(|| 0)), "0 = no limit");
        b.max.store(3, Ordering::Relaxed);
        b.started.store(0, Ordering::Relaxed);
        let first: Vec<bool> = (0..5).map(|_| b.take(|| 0)).collect();
        assert_eq!(first, [true, true, true, false, false]);
        let next: Vec<bool> = (0..4).map(|_| b.take(|| 1)).collect();
        assert_eq!(next, [true, true, true, false]);
        assert!(b.take(|| 7), "a later second has its own budget");
    }

    #[test]
    fn ratios_outside_zero_to_one_are_refused() {
        assert!(configure(1.5, 0).is_err());
        assert!(configure(-0.1, 0).is_err());
        assert!(configure(f64::NAN, 0).is_err());
    }
}
