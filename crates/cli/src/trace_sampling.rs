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
//! spread (a counter, not a coin: exactly that share, and reproducible).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static RATIO: OnceLock<f64> = OnceLock::new();
static SEEN: AtomicU64 = AtomicU64::new(0);

/// Set the share of requests traced when the client says nothing (once per process).
pub fn set_ratio(ratio: f64) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&ratio) {
        anyhow::bail!("observability.trace_sample_ratio = {ratio}: a share is between 0 and 1");
    }
    let _ = RATIO.set(ratio);
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
    if let Some(sampled) = parent.and_then(parent_sampled) {
        return sampled;
    }
    let ratio = RATIO.get().copied().unwrap_or(1.0);
    ratio >= 1.0 || nth_traced(SEEN.fetch_add(1, Ordering::Relaxed), ratio)
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
    fn ratios_outside_zero_to_one_are_refused() {
        assert!(set_ratio(1.5).is_err());
        assert!(set_ratio(-0.1).is_err());
        assert!(set_ratio(f64::NAN).is_err());
    }
}
