//! Per-tenant KV quotas: a cap on the blocks a tenant may hold (its running sequences and
//! its prefix-cache entries) and a floor that other tenants' admissions never evict or
//! preempt it below. A block is charged to the tenant that allocated it, until it is free
//! again — sharing a prefix in a shared cache scope costs the sharer nothing.
//!
//! A cap isolates: one tenant flooding long prompts cannot take the whole cache and push
//! every other tenant's prefixes out. A floor guarantees: a small tenant's hot prefix and
//! its running sequences survive a neighbour's burst. Without quotas (the default) the
//! pool is shared first come, first served, evicted by priority-weighted LRU.

use crate::scheduler::{Running, Scheduler};
use std::collections::{BTreeMap, HashMap};
use tokenfab_types::{SeqSlot, TenantId};

/// One tenant's share of the KV pool, in blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvQuota {
    /// At most this many blocks; `None`: no cap beyond the pool.
    pub max_blocks: Option<u32>,
    /// This many blocks are the tenant's even when others need room.
    pub min_blocks: u32,
}

/// Tenants by block-owner index, with their quotas.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    index: HashMap<TenantId, u32>,
    quotas: Vec<KvQuota>,
}

impl Owners {
    /// The owner index of `t`, assigned on first sight.
    pub fn intern(&mut self, t: &TenantId, configured: &BTreeMap<TenantId, KvQuota>) -> u32 {
        if let Some(&o) = self.index.get(t) {
            return o;
        }
        let o = self.quotas.len() as u32;
        self.index.insert(t.clone(), o);
        self.quotas
            .push(configured.get(t).copied().unwrap_or_default());
        o
    }

    pub fn get(&self, t: &TenantId) -> Option<u32> {
        self.index.get(t).copied()
    }

    pub fn quota(&self, owner: u32) -> KvQuota {
        self.quotas.get(owner as usize).copied().unwrap_or_default()
    }
}

impl Scheduler {
    /// KV blocks charged to tenant `t` now (its running sequences and cache entries).
    pub fn kv_blocks_of(&self, t: &TenantId) -> u32 {
        self.owners.get(t).map_or(0, |o| self.blocks.owned(o))
    }

    /// Blocks `owner` may still allocate under its cap.
    pub(crate) fn cap_headroom(&self, owner: u32) -> u32 {
        match self.owners.quota(owner).max_blocks {
            Some(cap) => cap.saturating_sub(self.blocks.owned(owner)),
            None => u32::MAX,
        }
    }

    /// Make `n` blocks of headroom under `owner`'s cap by evicting its own cache entries
    /// (never those in `keep`), least valuable first. False when that is not enough.
    pub(crate) fn cap_room(&mut self, owner: u32, n: u32, keep: &[SeqSlot]) -> bool {
        while self.cap_headroom(owner) < n {
            if !self.evict_where(keep, |_, c| c.owner == owner) {
                return false;
            }
        }
        true
    }

    /// Whether `owner`'s KV is off limits to `requester`: another tenant, and `owner` is
    /// at or below its floor. `requester == None` (no one in particular: a deadlock is
    /// being broken, or the cache cleared) respects no floor.
    pub(crate) fn protected(&self, owner: u32, requester: Option<u32>) -> bool {
        match requester {
            Some(r) if r != owner => {
                self.blocks.owned(owner) <= self.owners.quota(owner).min_blocks
            }
            _ => false,
        }
    }

    /// Whether `owner`, taking `need` more blocks, stays within its floor: then it may
    /// displace tenants above theirs.
    pub(crate) fn within_floor(&self, owner: u32, need: u32) -> bool {
        self.blocks.owned(owner) + need <= self.owners.quota(owner).min_blocks
    }

    /// Blocks `owner`'s running sequences hold or will need for their known tokens.
    pub(crate) fn committed(&self, owner: u32) -> u32 {
        self.running
            .iter()
            .filter(|r| r.owner == owner)
            .map(|r| (r.blocks.len() as u32).max(self.blocks.blocks_for(r.known)))
            .sum()
    }

    /// A running sequence to preempt so that `owner` (within its floor) gets room: of a
    /// tenant above its own floor and not `exclude`d, the cheapest to recompute.
    pub(crate) fn floor_victim(
        &self,
        owner: u32,
        exclude: impl Fn(&Running) -> bool,
    ) -> Option<usize> {
        (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                r.owner != owner && !self.protected(r.owner, Some(owner)) && !exclude(r)
            })
            .min_by_key(|&i| self.running[i].recompute_order())
    }
}
