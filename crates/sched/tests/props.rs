//! Property tests over random sequences of arrive / step / cancel, with end-of-generation
//! tokens drawn at random: the block pool never leaks, refcounts match owners, every
//! request ends exactly once, and equal-weight tenants share service fairly.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tokenfab_sched::{Band, Ended, SchedConfig, SchedRequest, Scheduler, Slo, StepResult};
use tokenfab_types::{Nanos, RequestId, TenantId, Tokens};

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        tenant: u8,
        band: u8,
        prompt: u16,
        max_new: u8,
    },
    Step {
        eog_mask: u32,
    },
    Cancel {
        pick: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 0u8..3, 1u16..400, 1u8..40).prop_map(|(tenant, band, prompt, max_new)| Op::Arrive { tenant, band, prompt, max_new }),
        6 => any::<u32>().prop_map(|eog_mask| Op::Step { eog_mask }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
    ]
}

fn config() -> SchedConfig {
    SchedConfig {
        slots: 4,
        kv_blocks: 48,
        block_tokens: 16,
        max_seq_tokens: 700,
        max_step_tokens: 64,
        max_prefill_chunk: 32,
        max_waiting: 6,
        max_waiting_tokens: 1500,
        watermark_blocks: 2,
    }
}

struct Harness {
    s: Scheduler,
    next: u64,
    now: u64,
    live: BTreeSet<RequestId>,
    ended: BTreeMap<RequestId, u32>,
    tenant_of: BTreeMap<RequestId, String>,
}

impl Harness {
    fn new(cfg: SchedConfig) -> Self {
        Harness {
            s: Scheduler::new(cfg),
            next: 1,
            now: 0,
            live: BTreeSet::new(),
            ended: BTreeMap::new(),
            tenant_of: BTreeMap::new(),
        }
    }

    fn end(&mut self, e: &Ended) {
        self.live.remove(&e.id());
        *self.ended.entry(e.id()).or_insert(0) += 1;
    }

    fn arrive(&mut self, tenant: &str, band: Band, prompt: u64, max_new: u64) {
        let id = RequestId(self.next);
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

    /// One step; returns (request, tokens computed in this step) per work item.
    fn step(&mut self, eog_mask: u32) -> Vec<(RequestId, u64, bool)> {
        self.now += 1_000_000;
        let plan = self.s.plan(Nanos(self.now));
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
        let ended = self.s.complete(
            Nanos(self.now),
            &StepResult {
                sampled,
                elapsed: Nanos(1_000_000),
            },
        );
        for e in &ended {
            self.end(e);
        }
        done
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("proptest-regressions/props.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_leaks_and_every_request_ends_once(ops in prop::collection::vec(op(), 1..200)) {
        let mut h = Harness::new(config());
        let total = h.s.blocks().total();
        for op in ops {
            match op {
                Op::Arrive { tenant, band, prompt, max_new } => {
                    h.arrive(&format!("t{tenant}"), Band::ALL[band as usize], u64::from(prompt), u64::from(max_new));
                }
                Op::Step { eog_mask } => { h.step(eog_mask); }
                Op::Cancel { pick } => {
                    if !h.live.is_empty() {
                        let id = *h.live.iter().nth(pick as usize % h.live.len()).expect("non-empty");
                        let e = h.s.cancel(id).expect("live request is known");
                        h.end(&e);
                        prop_assert!(h.s.cancel(id).is_none(), "a request ends once");
                    }
                }
            }
            prop_assert_eq!(h.s.check_invariants(), Ok(()));
        }
        // Drain: everything admitted finishes within a bounded number of steps.
        let mut steps = 0;
        while !h.s.is_idle() {
            h.step(0);
            steps += 1;
            prop_assert!(steps < 10_000, "did not drain");
            prop_assert_eq!(h.s.check_invariants(), Ok(()));
        }
        prop_assert!(h.live.is_empty(), "requests never ended: {:?}", h.live);
        prop_assert!(h.ended.values().all(|n| *n == 1), "a request ended twice");
        prop_assert_eq!(h.ended.len() as u64, h.next - 1);
        prop_assert_eq!(h.s.blocks().free_count(), total);
    }

    #[test]
    fn equal_tenants_get_service_within_2x_per_100_steps(
        prompts in prop::collection::vec((1u64..64, 1u64..16), 200),
    ) {
        let mut cfg = config();
        cfg.max_waiting = 64;
        cfg.max_waiting_tokens = 1 << 20;
        let mut h = Harness::new(cfg);
        let mut it = prompts.iter().cycle();
        let mut service: Vec<BTreeMap<String, u64>> = Vec::new();
        for _ in 0..600 {
            // Both tenants stay backlogged, but "a" keeps 6× the queue depth of "b": a
            // first-come-first-served queue would give "a" most of the service.
            for (t, depth) in [("a", 6), ("b", 1)] {
                while h.live.iter().filter(|id| h.tenant_of[id] == t).count() < depth + 4 {
                    let (p, m) = it.next().copied().unwrap_or((8, 8));
                    h.arrive(t, Band::Standard, p, m);
                }
            }
            let done = h.step(0);
            let mut per: BTreeMap<String, u64> = BTreeMap::new();
            for (id, n, decode) in done {
                let tenant = h.tenant_of[&id].clone();
                *per.entry(tenant).or_insert(0) += if decode { 2 } else { n };
            }
            service.push(per);
        }
        // Skip warm-up; compare every 100-step window.
        for w in service[100..].windows(100).step_by(10) {
            let sum = |t: &str| w.iter().map(|m| m.get(t).copied().unwrap_or(0)).sum::<u64>();
            let (a, b) = (sum("a"), sum("b"));
            prop_assert!(a <= 2 * b && b <= 2 * a, "unfair window: a={} b={}", a, b);
        }
    }
}
