//! Tenants' weighted shares of the running batch: who is owed a place in a full batch
//! (`preempt_for_fair_share`) and whose new request gets a step of its own
//! (`quiet_start`).

use crate::queue::Fairness;
use crate::request::Band;
use crate::scheduler::{Running, Scheduler};
use tokenfab_types::RequestId;

/// The tenants of one band in the running batch, each with its weight and the sequences
/// it runs there.
struct BatchShares {
    /// (owner, weight, running sequences).
    tenants: Vec<(u32, u64, usize)>,
    total_weight: u64,
}

impl BatchShares {
    /// The tenants running in `band`, and `with` (owner, weight) if it runs nothing.
    fn of(running: &[Running], band: Band, with: (u32, u32)) -> Self {
        let mut tenants: Vec<(u32, u64, usize)> = Vec::new();
        for r in running.iter().filter(|r| r.req.band == band) {
            match tenants.iter_mut().find(|t| t.0 == r.owner) {
                Some(t) => t.2 += 1,
                None => tenants.push((r.owner, u64::from(r.req.weight.max(1)), 1)),
            }
        }
        if !tenants.iter().any(|t| t.0 == with.0) {
            tenants.push((with.0, u64::from(with.1.max(1)), 0));
        }
        let total_weight = tenants.iter().map(|t| t.1).sum();
        BatchShares {
            tenants,
            total_weight,
        }
    }

    /// Whether `owner`, running `more` sequences more than it does, would run fewer than
    /// `1 / den` of its weighted share of `places` (`(count + more) × den < places × w /
    /// W`, compared without division).
    fn below(&self, owner: u32, more: usize, places: usize, den: u64) -> bool {
        self.tenants
            .iter()
            .find(|t| t.0 == owner)
            .is_some_and(|t| (t.2 + more) as u64 * self.total_weight * den < places as u64 * t.1)
    }

    /// Sequences the band's tenants run.
    fn running(&self) -> usize {
        self.tenants.iter().map(|t| t.2).sum()
    }

    /// The tenants other than `owner` running more than their weighted share of `places`.
    fn above(&self, owner: u32, places: usize) -> Vec<u32> {
        (self.tenants.iter())
            .filter(|t| t.0 != owner && t.2 as u64 * self.total_weight > places as u64 * t.1)
            .map(|t| t.0)
            .collect()
    }
}

/// A quiet tenant's request that starts in a step of its own (`Scheduler::quiet_start`).
pub(crate) struct QuietStart {
    pub id: RequestId,
    /// Its tenant and band: no other tenant's request of that band or a lower one starts
    /// in its steps.
    pub owner: u32,
    pub band: Band,
    /// Still in the queue (else running, its prompt not all computed).
    pub waiting: bool,
    /// Running sequences with no work in that step, sorted.
    pub held: Vec<RequestId>,
}

impl Scheduler {
    /// When the running batch is full and the next request by policy is owed a place,
    /// preempt running sequences (the cheapest to recompute) to make one for it and for
    /// each of its tenant's other waiting requests of that band still owed one: sequences
    /// of a lower band, or — within the band — of tenants above their weighted share of
    /// the batch while the waiting tenant is below its own. Without this a tenant that
    /// fills the batch keeps every place until its requests finish, and another tenant's
    /// first token waits for them (noisy neighbour); making room for one request at a
    /// time left the second of two arriving together waiting for the flood to catch up
    /// with the first one's service.
    pub(crate) fn preempt_for_fair_share(&mut self) {
        let full = self.cfg.max_running as usize;
        if self.running.len() < full {
            return;
        }
        let Some(next) = self.queue.peek(&self.fair) else {
            return;
        };
        let (band, tenant, weight) = (next.req.band, next.owner, next.req.weight);
        let mut waiting: Option<usize> = None;
        // Places already made for the tenant's waiting requests in this call.
        let mut made = 0;
        while self.running.len() + made >= full {
            let Some(lowest) = self.running.iter().map(|r| r.req.band).max() else {
                return;
            };
            // None: any sequence of the lowest band; else those of the tenants above
            // their share in the waiting request's band.
            let over = if lowest > band {
                None
            } else {
                let shares = BatchShares::of(&self.running, band, (tenant, weight));
                let over = shares.above(tenant, full);
                if !shares.below(tenant, made, full, 1) || over.is_empty() {
                    return;
                }
                Some(over)
            };
            let victim = (0..self.running.len())
                .filter(|&i| {
                    let r = &self.running[i];
                    match &over {
                        None => r.req.band == lowest,
                        Some(over) => r.req.band == band && over.contains(&r.owner),
                    }
                })
                .min_by_key(|&i| self.running[i].recompute_order());
            let Some(v) = victim else {
                return;
            };
            self.preempt(v);
            made += 1;
            let waiting = *waiting.get_or_insert_with(|| {
                (self.queue.iter())
                    .filter(|w| w.owner == tenant && w.req.band == band)
                    .count()
            });
            if made >= waiting {
                return;
            }
        }
    }

    /// The next request by policy, to get its first token in steps of its own, and the
    /// running sequences whose work waits in them: those of lower bands and of tenants
    /// above their weighted share of the batch. Only when that request is short (one
    /// chunk), its tenant is the least served active one (VTC; or past it by less than one
    /// chunk's charge) and runs less than half its own share, and
    /// `SchedConfig::isolate_quiet_starts` is on; a request so started keeps its steps to
    /// itself until its prompt is computed.
    ///
    /// On a CPU a step's time grows with every sequence it decodes (2 cores: ~15 ms at
    /// one, ~144 ms at sixteen), so a quiet tenant's prompt computed beside a flood's
    /// twenty decodes waits for all of them: its TTFT was 2.5–2.8× its figure alone
    /// (`scripts/bench-noisy`). The flood's streams pay the steps of each such start
    /// (two for most chats), which the fairness counters bound: the quiet tenant stops
    /// being eligible once its prompts have cost one chunk more than the flood's service.
    pub(crate) fn quiet_start(&self) -> Option<QuietStart> {
        if !self.cfg.isolate_quiet_starts || self.fair.tenants() < 2 {
            return None;
        }
        // A quiet start's prompt not computed yet (its tail after the last full block is
        // a piece of its own, so a prompt takes two steps): the others wait until its
        // first token, or it would wait for the flood's step after all.
        if let Some(r) = self.running.iter().find(|r| r.computed < r.quiet_until) {
            let (band, owner) = (r.req.band, r.owner);
            let shares = BatchShares::of(&self.running, band, (owner, r.req.weight));
            let over = shares.above(owner, shares.running());
            return self.holding(band, &over).map(|held| QuietStart {
                id: r.req.id,
                owner,
                band,
                waiting: false,
                held,
            });
        }
        let room = self.running.len() < self.cfg.max_running as usize;
        let next = self.queue.peek(&self.fair).filter(|_| room)?;
        let (band, owner) = (next.req.band, next.owner);
        let short = next.req.prompt.0 + next.generated.0 <= u64::from(self.cfg.max_prefill_chunk);
        // Least served, or it would be but for one short prompt's charge: a request
        // arriving while its tenant's previous one decodes found that one's prompt
        // charge had put its tenant just past the flood, and started beside the flood's
        // decodes.
        let slack = Fairness::cost(next.req.weight, u64::from(self.cfg.max_prefill_chunk), 0);
        let least = (self.active_min_counter())
            .is_some_and(|min| self.fair.counter(owner) <= min.saturating_add(slack));
        if !short || !least {
            return None;
        }
        let shares = BatchShares::of(&self.running, band, (owner, next.req.weight));
        // Its place included.
        let places = shares.running() + 1;
        if !shares.below(owner, 0, places, 2) {
            return None;
        }
        let over = shares.above(owner, places);
        self.holding(band, &over).map(|held| QuietStart {
            id: next.req.id,
            owner,
            band,
            waiting: true,
            held,
        })
    }

    /// The running sequences of bands below `band` and of the tenants `over` in it,
    /// sorted; `None` if there are none.
    fn holding(&self, band: Band, over: &[u32]) -> Option<Vec<RequestId>> {
        let mut held: Vec<RequestId> = (self.running.iter())
            .filter(|r| r.req.band > band || (r.req.band == band && over.contains(&r.owner)))
            .map(|r| r.req.id)
            .collect();
        held.sort_unstable();
        (!held.is_empty()).then_some(held)
    }
}
