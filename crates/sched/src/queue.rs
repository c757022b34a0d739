//! The waiting queue: strict priority bands; within a band, weighted fairness between
//! tenants by virtual token counters (VTC, Sheng et al., "Fairness in Serving Large
//! Language Models", OSDI 2024); within a tenant, earliest deadline first.

use crate::request::{Band, SchedRequest};
use tokenfab_types::{RequestId, Tokens};

/// Fixed-point scale of virtual-token counters, so weights divide without floats.
const VTC_SCALE: u64 = 1_000;

/// A waiting request and what the core already knows of it.
#[derive(Clone, Debug)]
pub(crate) struct Waiting {
    pub req: SchedRequest,
    /// The tenant's index in the scheduler's owner table (see `quota::Owners`).
    pub owner: u32,
    /// Tokens generated before a preemption; they are recomputed with the prompt.
    pub generated: Tokens,
    /// Prompt tokens found in the prefix cache when it was queued: prefill it will likely
    /// not need (for TTFT predictions).
    pub cached: u64,
    /// Order of arrival into the queue, the final tie-break.
    pub seq_no: u64,
}

/// Per-tenant virtual token counters, indexed by the tenant's owner index (interned once
/// at submission, so the hot path compares integers, not tenant names).
#[derive(Clone, Debug, Default)]
pub struct Fairness {
    counters: Vec<u64>,
    /// The highest counter so far: where a tenant starts when nobody else is active.
    high: u64,
}

impl Fairness {
    /// Tenants seen so far (every tenant is lifted on its first request).
    pub fn tenants(&self) -> usize {
        self.counters.len()
    }

    pub fn counter(&self, owner: u32) -> u64 {
        self.counters.get(owner as usize).copied().unwrap_or(0)
    }

    fn slot(&mut self, owner: u32) -> &mut u64 {
        let i = owner as usize;
        if i >= self.counters.len() {
            self.counters.resize(i + 1, 0);
        }
        &mut self.counters[i]
    }

    /// Charge `prompt` prefilled and `output` generated tokens to a tenant:
    /// prompt ×1, output ×2, divided by the tenant's weight.
    pub fn charge(&mut self, owner: u32, weight: u32, prompt: u64, output: u64) {
        let cost = Fairness::cost(weight, prompt, output);
        let c = self.slot(owner);
        *c += cost;
        let c = *c;
        self.high = self.high.max(c);
    }

    /// What [`charge`](Self::charge) adds to the counter of a tenant of `weight`.
    pub fn cost(weight: u32, prompt: u64, output: u64) -> u64 {
        (prompt + 2 * output) * VTC_SCALE / u64::from(weight.max(1))
    }

    /// A tenant returning from idle is lifted to the minimum counter of the active
    /// tenants, so it cannot bank credit while away. With nobody active it is lifted to
    /// the highest counter: service a tenant had while alone is not held against it
    /// later (without this, a flood arriving after a quiet tenant had the server to
    /// itself took everything until its counter caught up — seconds of the quiet
    /// tenant's requests waiting). Lifted to just below the minimum (a thousandth of a
    /// token), it goes before the active tenants it would tie with, which were served
    /// while it was away: at a tie the older requests of a flood went first, and a quiet
    /// tenant's pair of requests waited a step behind them (`scripts/bench-noisy`).
    pub fn lift(&mut self, owner: u32, active_min: Option<u64>) {
        let min = active_min.map_or(self.high, |m| m.saturating_sub(1));
        let c = self.slot(owner);
        *c = (*c).max(min);
    }
}

#[derive(Clone, Debug, Default)]
pub struct WaitQueue {
    bands: [Vec<Waiting>; 3],
    next_seq: u64,
    tokens: u64,
}

impl WaitQueue {
    pub fn len(&self) -> usize {
        self.bands.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bands.iter().all(Vec::is_empty)
    }

    pub fn len_band(&self, b: Band) -> usize {
        self.bands[b.index()].len()
    }

    /// Prompt (plus recomputed) tokens waiting, across bands.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub(crate) fn push(&mut self, req: SchedRequest, owner: u32, generated: Tokens, cached: u64) {
        self.tokens += req.prompt.0 + generated.0;
        let seq_no = self.next_seq;
        self.next_seq += 1;
        self.bands[req.band.index()].push(Waiting {
            req,
            owner,
            generated,
            cached,
            seq_no,
        });
    }

    pub(crate) fn contains_owner(&self, owner: u32) -> bool {
        self.bands.iter().flatten().any(|w| w.owner == owner)
    }

    pub(crate) fn owners(&self) -> impl Iterator<Item = u32> + '_ {
        self.bands.iter().flatten().map(|w| w.owner)
    }

    /// The request the policy would admit next, without removing it.
    pub(crate) fn peek(&self, fair: &Fairness) -> Option<&Waiting> {
        self.peek_where(fair, |_| false)
    }

    /// As [`peek`](Self::peek), passing over requests for which `defer` holds (a lower
    /// band goes ahead only when every request of the higher bands is deferred).
    pub(crate) fn peek_where(
        &self,
        fair: &Fairness,
        defer: impl Fn(&Waiting) -> bool,
    ) -> Option<&Waiting> {
        self.bands.iter().find_map(|band| {
            band.iter().filter(|w| !defer(w)).min_by(|a, b| {
                (fair.counter(a.owner), a.req.deadline(), a.seq_no).cmp(&(
                    fair.counter(b.owner),
                    b.req.deadline(),
                    b.seq_no,
                ))
            })
        })
    }

    /// The same request as [`peek_where`](Self::peek_where), and the same calls of
    /// `defer` wherever `defer` may have a side effect, while calling it far less: each
    /// band's head in policy order is tried first, and only when it is passed over does
    /// every request of the band get asked; otherwise `defer` runs, besides the head, only
    /// on the requests where `noted` holds — which must be every request on which `defer`
    /// can have a side effect. `defer` is what makes a peek expensive (a prefix lookup per
    /// request), and a saturated worker has thousands waiting.
    pub(crate) fn peek_where_lazily(
        &self,
        fair: &Fairness,
        defer: impl Fn(&Waiting) -> bool,
        noted: impl Fn(&Waiting) -> bool,
    ) -> Option<&Waiting> {
        let key = |w: &Waiting| (fair.counter(w.owner), w.req.deadline(), w.seq_no);
        self.bands.iter().find_map(|band| {
            let head = band.iter().min_by_key(|w| key(w))?;
            if defer(head) {
                return band.iter().filter(|w| !defer(w)).min_by_key(|w| key(w));
            }
            for w in band.iter().filter(|w| !std::ptr::eq(*w, head)) {
                if noted(w) {
                    defer(w);
                }
            }
            Some(head)
        })
    }

    pub(crate) fn remove(&mut self, id: RequestId) -> Option<Waiting> {
        for band in &mut self.bands {
            if let Some(i) = band.iter().position(|w| w.req.id == id) {
                let w = band.remove(i);
                self.tokens -= w.req.prompt.0 + w.generated.0;
                return Some(w);
            }
        }
        None
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Waiting> {
        self.bands.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Slo;
    use tokenfab_types::{Nanos, TenantId};

    fn req(id: u64, tenant: &str, band: Band) -> SchedRequest {
        SchedRequest {
            id: RequestId(id),
            tenant: TenantId(tenant.into()),
            band,
            weight: 1,
            prompt: Tokens(10),
            max_new: Tokens(10),
            arrival: Nanos(id),
            slo: Slo::default(),
            block_hashes: vec![],
        }
    }

    #[test]
    fn bands_are_strict_and_tenants_fair() {
        let mut q = WaitQueue::default();
        let mut f = Fairness::default();
        let (a, b) = (0, 1);
        q.push(req(1, "a", Band::Batch), a, Tokens(0), 0);
        q.push(req(2, "a", Band::Standard), a, Tokens(0), 0);
        q.push(req(3, "b", Band::Standard), b, Tokens(0), 0);
        f.charge(a, 1, 100, 0);
        // Band standard first; within it tenant b has the lower counter.
        assert_eq!(q.peek(&f).map(|w| w.req.id), Some(RequestId(3)));
        q.remove(RequestId(3));
        assert_eq!(q.peek(&f).map(|w| w.req.id), Some(RequestId(2)));
        assert_eq!(q.tokens(), 20);
    }

    #[test]
    fn a_tenant_back_from_idle_goes_before_the_active_tenant_it_ties_with() {
        let mut q = WaitQueue::default();
        let mut f = Fairness::default();
        let (a, b) = (0, 1);
        f.lift(a, None);
        f.charge(a, 1, 500, 0);
        q.push(req(1, "a", Band::Standard), a, Tokens(0), 0);
        // B had less service than A while away: it cannot bank it.
        f.charge(b, 1, 100, 0);
        f.lift(b, Some(f.counter(a)));
        assert!(f.counter(b) < f.counter(a));
        assert!(f.counter(a) - f.counter(b) < VTC_SCALE);
        q.push(req(2, "b", Band::Standard), b, Tokens(0), 0);
        assert_eq!(q.peek(&f).map(|w| w.req.id), Some(RequestId(2)));
        // With nobody active, a tenant starts at the highest counter so far.
        f.lift(2, None);
        assert_eq!(f.counter(2), f.counter(a));
    }

    #[test]
    fn lazy_peek_picks_what_peek_where_picks_and_asks_every_noted_request() {
        let mut q = WaitQueue::default();
        let mut f = Fairness::default();
        for id in 1..=12u64 {
            let band = if id % 3 == 0 {
                Band::Batch
            } else {
                Band::Standard
            };
            q.push(
                req(id, &format!("t{}", id % 4), band),
                (id % 4) as u32,
                Tokens(0),
                0,
            );
        }
        f.charge(1, 1, 300, 0);
        f.charge(2, 1, 100, 0);
        // Every subset of deferred requests among the first 10 ids (and none beyond).
        for mask in 0u32..1 << 10 {
            let deferred = |w: &Waiting| w.req.id.0 <= 10 && mask & (1 << (w.req.id.0 - 1)) != 0;
            let noted = |w: &Waiting| w.req.id.0.is_multiple_of(2);
            let eager_asked = std::cell::RefCell::new(Vec::new());
            let eager = q.peek_where(&f, |w| {
                eager_asked.borrow_mut().push(w.req.id);
                deferred(w)
            });
            let lazy_asked = std::cell::RefCell::new(Vec::new());
            let lazy = q.peek_where_lazily(
                &f,
                |w| {
                    lazy_asked.borrow_mut().push(w.req.id);
                    deferred(w)
                },
                noted,
            );
            assert_eq!(
                lazy.map(|w| w.req.id),
                eager.map(|w| w.req.id),
                "mask {mask:b}"
            );
            let mut lazy_asked = lazy_asked.into_inner();
            lazy_asked.sort();
            for id in eager_asked.into_inner() {
                if id.0.is_multiple_of(2) {
                    assert!(lazy_asked.binary_search(&id).is_ok(), "noted {id:?} asked");
                }
            }
        }
    }
}
