//! The prefix cache: finished sequences keep their indexed prompt blocks (and their
//! executor slot, which holds those KV cells) until evicted. Eviction takes the entry
//! idle longest, with idle time weighted by band (a batch entry ages 4× and a standard
//! one 2× as fast as an interactive one), and never one of a tenant at its KV floor on
//! behalf of another tenant (see `quota.rs`).

use crate::kv::BlockId;
use crate::request::Band;
use crate::scheduler::{Running, Scheduler};
use tokenfab_types::{Nanos, SeqSlot};

#[derive(Clone, Debug)]
pub(crate) struct CachedSeq {
    pub slot: SeqSlot,
    pub blocks: Vec<BlockId>,
    pub last_used: Nanos,
    /// The tenant (block-owner index) and band of the request that computed it.
    pub owner: u32,
    pub band: Band,
}

/// How much faster than an interactive entry an idle entry of `band` ages.
fn aging(band: Band) -> u64 {
    match band {
        Band::Interactive => 1,
        Band::Standard => 2,
        Band::Batch => 4,
    }
}

impl Scheduler {
    /// A sequence has ended: keep its indexed prefix as a cache entry when that adds
    /// blocks nobody else holds; otherwise give everything back.
    pub(crate) fn retire(&mut self, r: Running) {
        let keep = r
            .blocks
            .iter()
            .take_while(|b| self.blocks.is_indexed(**b))
            .count();
        let adds = r.blocks[..keep]
            .iter()
            .any(|b| self.blocks.refcount(*b) == 1);
        if keep == 0 || !adds {
            self.free_running(&r);
            return;
        }
        for b in &r.blocks[keep..] {
            self.blocks.release(*b, r.slot);
        }
        let tokens = keep as u64 * u64::from(self.blocks.block_tokens());
        if r.computed > tokens {
            self.trim.push((r.slot, tokens));
        }
        self.cached.push(CachedSeq {
            slot: r.slot,
            blocks: r.blocks[..keep].to_vec(),
            last_used: self.now,
            owner: r.owner,
            band: r.req.band,
        });
    }

    /// Evict one cache entry for `requester` (never one in `pinned`, nor one of a tenant
    /// the requester may not take from). Returns false when there is none.
    pub(crate) fn evict_one(&mut self, pinned: &[SeqSlot], requester: Option<u32>) -> bool {
        self.evict_where(pinned, |s, c| !s.protected(c.owner, requester))
    }

    /// Evict the entry idle longest (band-weighted) among those `pick` accepts and not in
    /// `pinned`. Returns false when there is none.
    pub(crate) fn evict_where(
        &mut self,
        pinned: &[SeqSlot],
        pick: impl Fn(&Self, &CachedSeq) -> bool,
    ) -> bool {
        let now = self.now;
        let best = self
            .cached
            .iter()
            .enumerate()
            .filter(|(_, c)| !pinned.contains(&c.slot) && pick(self, c))
            .max_by_key(|(_, c)| {
                let idle = now.0.saturating_sub(c.last_used.0) + 1;
                (
                    idle.saturating_mul(aging(c.band)),
                    std::cmp::Reverse(c.slot),
                )
            })
            .map(|(i, _)| i);
        let Some(i) = best else {
            return false;
        };
        let c = self.cached.swap_remove(i);
        for b in &c.blocks {
            self.blocks.release(*b, c.slot);
        }
        self.trim.retain(|(s, _)| *s != c.slot);
        self.free_slots.push(c.slot);
        self.release.push(c.slot);
        self.stats.evictions += 1;
        true
    }

    /// Evict for `requester` until `n` blocks are free (or nothing it may evict is left).
    pub(crate) fn ensure_free(&mut self, n: u32, pinned: &[SeqSlot], requester: u32) -> bool {
        while self.blocks.free_count() < n {
            if !self.evict_one(pinned, Some(requester)) {
                return false;
            }
        }
        true
    }

    /// The cached prefix of a prompt: matched blocks (at most `limit_tokens` worth) and a
    /// slot holding all of them, to copy from.
    pub(crate) fn match_prefix(
        &self,
        hashes: &[u64],
        limit_tokens: u64,
    ) -> Option<(Vec<BlockId>, SeqSlot)> {
        let bt = u64::from(self.blocks.block_tokens());
        let mut found = self.blocks.lookup(hashes);
        found.truncate((limit_tokens / bt) as usize);
        let k = found.len();
        let last = *found.last()?;
        // Any holder of the last matched block holds the whole prefix (chain hashes), though
        // not necessarily the same block ids for earlier blocks when two sequences computed
        // the prefix at once. Share the source's own blocks: they stay held while the
        // source is pinned.
        let holders = self.blocks.holders(last);
        let source = if self.cfg.adopt_cached_slots {
            // A cache entry can be taken over in place instead of copying a whole stream:
            // the one that loses the fewest blocks past the match, then the lowest (it
            // keeps running sequences packed at the low slots).
            holders
                .iter()
                .filter_map(|s| Some((self.cache_entry(*s)?.blocks.len(), s.0, *s)))
                .min()
                .map(|(_, _, s)| s)
        } else {
            None
        };
        let source = source.or(holders.first().copied())?;
        let table = self
            .running
            .iter()
            .find(|r| r.slot == source)
            .map(|r| &r.blocks)
            .or_else(|| self.cache_entry(source).map(|c| &c.blocks))?;
        Some((table.get(..k)?.to_vec(), source))
    }

    /// Whether a new sequence with prefix `hit` takes the source's slot over in place
    /// ([`SchedConfig::adopt_cached_slots`](crate::SchedConfig)): the source must be a
    /// cache entry that no earlier admission of this plan copies from.
    ///
    /// Taking an entry over drops its blocks past the match, so it is done only when the
    /// match is at least half of the entry (llama-server's slot-similarity rule), or when
    /// no slot is free and one would have to be emptied anyway. Otherwise the new
    /// sequence copies the prefix into a free slot and the entry stays whole: at one
    /// request at a time, every request sharing only the system prompt's first block took
    /// the single entry over, so the cache never held more than the last prompt and a
    /// repeated or continued conversation was computed again from its second block.
    pub(crate) fn adoptable(
        &self,
        hit: &Option<(Vec<BlockId>, SeqSlot)>,
        pinned: &[SeqSlot],
    ) -> bool {
        self.cfg.adopt_cached_slots
            && hit.as_ref().is_some_and(|(matched, src)| {
                !pinned.contains(src)
                    && self.cache_entry(*src).is_some_and(|c| {
                        c.blocks.len() <= 2 * matched.len() || self.free_slots.is_empty()
                    })
            })
    }

    /// The cache entry holding `slot`, if that slot is one.
    fn cache_entry(&self, slot: SeqSlot) -> Option<&CachedSeq> {
        self.cached.iter().find(|c| c.slot == slot)
    }

    /// End the cache entry in `slot` so that a new sequence starts there on its first
    /// `keep_blocks` blocks (`tokens` tokens): the rest of its blocks go back to the pool
    /// and its cells past the prefix are trimmed in this plan.
    pub(crate) fn take_over(&mut self, slot: SeqSlot, keep_blocks: usize, tokens: u64) {
        if let Some(i) = self.cached.iter().position(|c| c.slot == slot) {
            let c = self.cached.swap_remove(i);
            for b in c.blocks.iter().skip(keep_blocks) {
                self.blocks.release(*b, slot);
            }
        }
        self.trim.retain(|(s, _)| *s != slot);
        self.trim.push((slot, tokens));
    }

    /// The lowest free slot: running sequences stay packed at the low end, so a
    /// per-sequence KV layout batches them as few runs of consecutive slots.
    pub(crate) fn take_free_slot(&mut self) -> Option<SeqSlot> {
        let (i, _) = self
            .free_slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.0)?;
        Some(self.free_slots.swap_remove(i))
    }

    /// Mark a cache entry as just used.
    pub(crate) fn touch(&mut self, slot: SeqSlot) {
        let now = self.now;
        if let Some(c) = self.cached.iter_mut().find(|c| c.slot == slot) {
            c.last_used = now;
        }
    }
}

impl Scheduler {
    /// Evict every cache entry (their slots are released with the next plan).
    pub fn clear_cache(&mut self) {
        while self.evict_one(&[], None) {}
    }
}
