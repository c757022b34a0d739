//! An in-memory store for tests and throwaway servers: the reference the SQL stores are
//! checked against by the conformance suite. Nothing survives the process.

use crate::model::{
    AttemptId, KeyRecord, Outcome, Recovery, Reservation, Settled, Settlement, TokenUsage,
    UsageQuery, UsageRow,
};
use crate::store::{Idempotency, IdempotencyClaim, LedgerError, LedgerStore, Result};
use crate::usage::Summer;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokenfab_types::{NanoUsd, TenantId};

#[derive(Clone, Debug)]
struct Row {
    r: Reservation,
    held: NanoUsd,
    progress: TokenUsage,
    settled: Option<(Outcome, NanoUsd)>,
}

/// An idempotency claim: (body hash, owning node, response once finished).
type IdemEntry = ([u8; 32], String, Option<Vec<u8>>);

#[derive(Default)]
struct State {
    keys: BTreeMap<String, KeyRecord>,
    rows: BTreeMap<AttemptId, Row>,
    idem: BTreeMap<(TenantId, String), IdemEntry>,
}

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| LedgerError::Storage("memory store lock poisoned".into()))
    }
}

fn settle_row(st: &mut State, id: &AttemptId, s: Settlement) -> Result<Settled> {
    let row = st
        .rows
        .get_mut(id)
        .filter(|r| r.settled.is_none())
        .ok_or_else(|| LedgerError::NotOpen(id.clone()))?;
    let cost = row
        .r
        .price
        .cost(s.usage.prompt, s.usage.cached, s.usage.completion);
    row.progress = s.usage;
    row.settled = Some((s.outcome, cost));
    let held = row.held;
    let key_id = row.r.key_id.clone();
    if let Some(k) = st.keys.get_mut(&key_id) {
        k.reserved = k.reserved - held;
        k.spent += cost;
    }
    Ok(Settled { cost, held })
}

#[async_trait]
impl LedgerStore for MemoryStore {
    async fn create_key(&self, key: &KeyRecord) -> Result<()> {
        let mut st = self.lock()?;
        if st.keys.contains_key(&key.id) {
            return Err(LedgerError::Storage(format!("key id {} exists", key.id)));
        }
        st.keys.insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>> {
        Ok(self.lock()?.keys.get(id).cloned())
    }

    async fn list_keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyRecord>> {
        Ok(self
            .lock()?
            .keys
            .values()
            .filter(|k| tenant.is_none_or(|t| &k.tenant == t))
            .cloned()
            .collect())
    }

    async fn revoke_key(&self, id: &str, _now: i64) -> Result<bool> {
        Ok(self
            .lock()?
            .keys
            .get_mut(id)
            .map(|k| k.revoked = true)
            .is_some())
    }

    async fn rotate_key(&self, id: &str, hash: [u8; 32]) -> Result<bool> {
        Ok(self
            .lock()?
            .keys
            .get_mut(id)
            .filter(|k| !k.revoked)
            .map(|k| k.hash = hash)
            .is_some())
    }

    async fn reserve(&self, r: &Reservation) -> Result<()> {
        let mut st = self.lock()?;
        if st.rows.contains_key(&r.id) {
            return Err(LedgerError::DuplicateReservation(r.id.clone()));
        }
        let needed = r.amount();
        let key = st
            .keys
            .get_mut(&r.key_id)
            .ok_or_else(|| LedgerError::UnknownKey(r.key_id.clone()))?;
        if key.revoked {
            return Err(LedgerError::Revoked(r.key_id.clone()));
        }
        if let Some(remaining) = key.remaining() {
            if needed > remaining {
                return Err(LedgerError::InsufficientBudget { needed, remaining });
            }
        }
        key.reserved += needed;
        st.rows.insert(
            r.id.clone(),
            Row {
                r: r.clone(),
                held: needed,
                progress: TokenUsage::default(),
                settled: None,
            },
        );
        Ok(())
    }

    async fn progress(&self, id: &AttemptId, usage: TokenUsage) -> Result<()> {
        let mut st = self.lock()?;
        let row = st
            .rows
            .get_mut(id)
            .filter(|r| r.settled.is_none())
            .ok_or_else(|| LedgerError::NotOpen(id.clone()))?;
        row.progress = usage;
        Ok(())
    }

    async fn settle(&self, id: &AttemptId, s: Settlement) -> Result<Settled> {
        settle_row(&mut *self.lock()?, id, s)
    }

    async fn recover(&self, node: &str, now: i64) -> Result<Recovery> {
        let mut st = self.lock()?;
        let open: Vec<(AttemptId, TokenUsage)> = st
            .rows
            .iter()
            .filter(|(_, r)| r.settled.is_none() && r.r.node == node)
            .map(|(id, r)| (id.clone(), r.progress))
            .collect();
        st.idem
            .retain(|_, (_, owner, done)| done.is_some() || owner != node);
        let mut rec = Recovery::default();
        for (id, usage) in open {
            settle_row(&mut st, &id, Settlement::recovered(usage, now))?;
            rec.count(&usage);
        }
        Ok(rec)
    }

    async fn open_reservations(&self) -> Result<u64> {
        Ok(self
            .lock()?
            .rows
            .values()
            .filter(|r| r.settled.is_none())
            .count() as u64)
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        let st = self.lock()?;
        let mut sum = Summer::default();
        for row in st.rows.values() {
            let Some((_, cost)) = row.settled else {
                continue;
            };
            let r = &row.r;
            if q.tenant.as_ref().is_some_and(|t| t != &r.tenant)
                || q.key_id.as_ref().is_some_and(|k| k != &r.key_id)
                || q.since.is_some_and(|s| r.now < s)
            {
                continue;
            }
            sum.add(q.group_by, r, row.progress, cost);
        }
        Ok(sum.rows())
    }

    async fn idempotency_claim(&self, c: &IdempotencyClaim) -> Result<Idempotency> {
        let mut st = self.lock()?;
        let slot = (c.tenant.clone(), c.key.clone());
        Ok(match st.idem.get(&slot) {
            None => {
                st.idem.insert(slot, (c.body, c.node.clone(), None));
                Idempotency::Claimed
            }
            Some((body, _, _)) if *body != c.body => Idempotency::Mismatch,
            Some((_, _, None)) => Idempotency::InFlight,
            Some((_, _, Some(resp))) => Idempotency::Done(resp.clone()),
        })
    }

    async fn idempotency_complete(
        &self,
        tenant: &TenantId,
        key: &str,
        response: &[u8],
    ) -> Result<()> {
        let mut st = self.lock()?;
        if let Some(e) = st.idem.get_mut(&(tenant.clone(), key.to_owned())) {
            e.2 = Some(response.to_vec());
        }
        Ok(())
    }

    async fn idempotency_release(&self, tenant: &TenantId, key: &str) -> Result<()> {
        let mut st = self.lock()?;
        let slot = (tenant.clone(), key.to_owned());
        if st.idem.get(&slot).is_some_and(|e| e.2.is_none()) {
            st.idem.remove(&slot);
        }
        Ok(())
    }
}
