//! The test harness shared by the property tests (`props.rs`) and the planner's
//! scenario tests (`plan.rs`): a scheduler driven step by step against a model of the
//! executor's KV that checks every plan is executable and never crosses tenants.
#![allow(dead_code)] // each test crate uses its own part of it

use std::collections::{BTreeMap, BTreeSet};
use tokenfab_sched::{
    prefix_hashes, Band, Ended, KvQuota, SchedConfig, SchedRequest, Scheduler, Slo, StepPlan,
    StepResult,
};
use tokenfab_types::{Nanos, RequestId, SeqSlot, TenantId, TokenId, Tokens};

pub fn config() -> SchedConfig {
    SchedConfig {
        slots: 8,
        max_running: 4,
        kv_blocks: 48,
        block_tokens: 16,
        max_seq_tokens: 700,
        max_step_tokens: 64,
        max_prefill_chunk: 32,
        max_waiting: 6,
        max_waiting_tokens: 1500,
        watermark_blocks: 2,
        target_step: Some(Nanos::from_millis(20)),
        kv_quotas: BTreeMap::new(),
        adopt_cached_slots: false,
        min_prefill_piece: 1,
        isolate_quiet_starts: true,
    }
}

/// Tenant t0 capped at a third of the pool, t1 guaranteed a quarter.
pub fn with_quotas(mut cfg: SchedConfig) -> SchedConfig {
    let third = cfg.kv_blocks / 3;
    cfg.kv_quotas.insert(
        TenantId("t0".into()),
        KvQuota {
            max_blocks: Some(third),
            min_blocks: 0,
        },
    );
    cfg.kv_quotas.insert(
        TenantId("t1".into()),
        KvQuota {
            max_blocks: None,
            min_blocks: cfg.kv_blocks / 4,
        },
    );
    cfg
}

pub struct Harness {
    pub s: Scheduler,
    pub next: u64,
    pub now: u64,
    pub live: BTreeSet<RequestId>,
    pub ended: BTreeMap<RequestId, u32>,
    pub tenant_of: BTreeMap<RequestId, String>,
    /// A model of the executor's KV: tokens held per slot, and the tenant whose data it is.
    pub cells: BTreeMap<SeqSlot, (u64, String)>,
    pub hits: u64,
}

impl Harness {
    pub fn new(cfg: SchedConfig) -> Self {
        Harness {
            s: Scheduler::new(cfg),
            next: 1,
            now: 0,
            live: BTreeSet::new(),
            ended: BTreeMap::new(),
            tenant_of: BTreeMap::new(),
            cells: BTreeMap::new(),
            hits: 0,
        }
    }

    pub fn end(&mut self, e: &Ended) {
        self.live.remove(&e.id());
        *self.ended.entry(e.id()).or_insert(0) += 1;
    }

    pub fn arrive(&mut self, tenant: &str, band: Band, prompt: u64, max_new: u64) {
        self.arrive_grouped(tenant, band, prompt, max_new, None);
    }

    /// Prompts of a group share their first 100 tokens; the rest is unique.
    pub fn arrive_grouped(
        &mut self,
        tenant: &str,
        band: Band,
        prompt: u64,
        max_new: u64,
        group: Option<u8>,
    ) {
        let id = RequestId(self.next);
        let tokens: Vec<TokenId> = (0..prompt)
            .map(|k| match group {
                Some(g) if k < 100 => TokenId(i32::from(g) * 1000 + k as i32),
                _ => TokenId(-(self.next as i32) * 1000 - k as i32),
            })
            .collect();
        let block_hashes = prefix_hashes(tenant, &tokens, 16);
        self.next += 1;
        self.tenant_of.insert(id, tenant.to_owned());
        let req = SchedRequest {
            id,
            tenant: TenantId(tenant.into()),
            band,
            weight: 1,
            prompt: Tokens(prompt),
            max_new: Tokens(max_new),
            arrival: Nanos(self.now),
            slo: Slo::default(),
            block_hashes,
        };
        match self.s.admit(Nanos(self.now), req) {
            Ok(shed) => {
                self.live.insert(id);
                for e in &shed {
                    self.end(e);
                }
            }
            Err(_) => {
                *self.ended.entry(id).or_insert(0) += 1;
            }
        }
    }

    /// Apply a plan's KV operations to the executor model, checking they are executable
    /// in order and never move one tenant's cells to another.
    pub fn execute_kv(&mut self, plan: &StepPlan) {
        for s in &plan.release {
            self.cells.remove(s);
        }
        for (s, from) in &plan.trim {
            let c = self.cells.get_mut(s).expect("trim of an empty slot");
            c.0 = c.0.min(*from);
        }
        for (id, s) in &plan.start {
            let tenant = self.tenant_of[id].clone();
            match self.cells.get(s) {
                // A cache entry's slot taken over in place: the prefix stays, in-tenant.
                Some((held, owner)) => {
                    assert!(
                        self.s.config().adopt_cached_slots,
                        "{s:?} started while still holding {held} tokens"
                    );
                    assert_eq!(*owner, tenant, "slot taken over across tenants");
                    self.hits += held;
                }
                None => {
                    self.cells.insert(*s, (0, tenant));
                }
            }
        }
        for c in &plan.copies {
            let (held, owner) = self
                .cells
                .get(&c.from)
                .cloned()
                .expect("copy from an empty slot");
            assert!(
                held >= c.tokens,
                "copy of {} tokens from a slot holding {held}",
                c.tokens
            );
            let dst = self
                .cells
                .get_mut(&c.to)
                .expect("copy into an unstarted slot");
            assert_eq!(dst.1, owner, "prefix copied across tenants");
            assert_eq!(dst.0, 0);
            dst.0 = c.tokens;
            self.hits += c.tokens;
        }
        for w in &plan.work {
            let c = self
                .cells
                .get_mut(&w.slot)
                .expect("work on an unstarted slot");
            assert_eq!(
                c.0, w.pos,
                "{:?} at {} but the slot holds {}",
                w.id, w.pos, c.0
            );
            c.0 += u64::from(w.n);
        }
    }

    /// One step; returns (request, tokens computed in this step) per work item.
    pub fn step(&mut self, eog_mask: u32) -> Vec<(RequestId, u64, bool)> {
        self.now += 1_000_000;
        let plan = self.s.plan(Nanos(self.now));
        self.execute_kv(&plan);
        let sampled: Vec<_> = plan
            .work
            .iter()
            .filter(|w| w.sample)
            .enumerate()
            .map(|(i, w)| (w.id, eog_mask & (1 << (i % 32)) != 0))
            .collect();
        let done: Vec<_> = plan
            .work
            .iter()
            .map(|w| (w.id, u64::from(w.n), w.is_decode()))
            .collect();
        // A toy step-time model: 2 ms + 1 ms per decode + 0.25 ms per prefill token.
        let decodes = plan.work.iter().filter(|w| w.is_decode()).count() as u64;
        let prefill = plan.tokens() - decodes;
        let elapsed = Nanos(2_000_000 + decodes * 1_000_000 + prefill * 250_000);
        let ended = self
            .s
            .complete(Nanos(self.now), &StepResult { sampled, elapsed });
        for e in &ended {
            self.end(e);
        }
        done
    }
}
