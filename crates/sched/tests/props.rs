//! Property tests over random sequences of arrive / step / cancel, with end-of-generation
//! tokens drawn at random: the block pool never leaks, refcounts match owners, every
//! request ends exactly once, and equal-weight tenants share service fairly.

mod common;

use common::{config, with_quotas, Harness};
use proptest::prelude::*;
use std::collections::BTreeMap;
use tokenfab_sched::Band;
use tokenfab_types::TenantId;

#[derive(Clone, Debug)]
enum Op {
    Arrive {
        tenant: u8,
        band: u8,
        prompt: u16,
        max_new: u8,
        group: u8,
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
        3 => (0u8..3, 0u8..3, 1u16..400, 1u8..40, 0u8..3).prop_map(|(tenant, band, prompt, max_new, group)| Op::Arrive { tenant, band, prompt, max_new, group }),
        6 => any::<u32>().prop_map(|eog_mask| Op::Step { eog_mask }),
        1 => any::<u16>().prop_map(|pick| Op::Cancel { pick }),
    ]
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
    fn no_leaks_and_every_request_ends_once(
        ops in prop::collection::vec(op(), 1..200),
        tight in any::<bool>(),
        quotas in any::<bool>(),
        adopt in any::<bool>(),
    ) {
        let mut cfg = if quotas { with_quotas(config()) } else { config() };
        cfg.adopt_cached_slots = adopt;
        if tight {
            // No spare slots for cache entries: they must yield to new sequences.
            cfg.slots = 2;
            cfg.max_running = 2;
        }
        let mut h = Harness::new(cfg);
        let total = h.s.blocks().total();
        for op in ops {
            match op {
                Op::Arrive { tenant, band, prompt, max_new, group } => {
                    h.arrive_grouped(&format!("t{tenant}"), Band::ALL[band as usize], u64::from(prompt), u64::from(max_new), Some(group));
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
            // The prefix-hit counter (vllm:prefix_cache_hits_total) counts the reuse of
            // starts that reached the executor, not of starts the planner undid.
            prop_assert_eq!(h.s.stats().prefix_hit_tokens, h.hits);
            if let Some(cap) = h.s.config().kv_quotas.get(&TenantId("t0".into())).and_then(|q| q.max_blocks) {
                let held = h.s.kv_blocks_of(&TenantId("t0".into()));
                prop_assert!(held <= cap, "t0 holds {} blocks over its cap {}", held, cap);
            }
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
        // Prefix-cache entries may hold blocks; evicting them all must free everything.
        let cached_blocks = h.s.blocks().used_count();
        prop_assert!(cached_blocks == 0 || h.s.snapshot().cached_seqs > 0);
        h.s.clear_cache();
        prop_assert_eq!(h.s.check_invariants(), Ok(()));
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
