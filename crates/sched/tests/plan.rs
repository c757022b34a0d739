//! Scenario tests of the step planner and the cache: prefix reuse per tenant, cache
//! entries taken over or copied, fair shares of a full batch, a quiet tenant beside a
//! flood, KV quotas and SLO admission (chats beside long prompts: `long_prompts.rs`).

mod common;

use common::{config, Harness};
use tokenfab_sched::{
    prefix_hashes, Band, KvQuota, SchedConfig, SchedRequest, Scheduler, Slo, StepResult,
};
use tokenfab_types::{Nanos, RequestId, SeqSlot, TenantId, TokenId, Tokens};

#[test]
fn shared_prefix_is_reused_within_a_tenant_only() {
    let mut h = Harness::new(config());
    // Request 1 computes a 100-token group prefix for tenant a and finishes.
    h.arrive_grouped("a", Band::Standard, 150, 1, Some(7));
    while !h.s.is_idle() {
        h.step(0);
    }
    assert_eq!(h.hits, 0);
    // The same prefix from another tenant: no reuse.
    h.arrive_grouped("b", Band::Standard, 150, 1, Some(7));
    while !h.s.is_idle() {
        h.step(0);
    }
    assert_eq!(h.hits, 0, "a prefix crossed tenants");
    // The same prefix from tenant a again: its 6 full shared blocks (96 tokens) are reused.
    h.arrive_grouped("a", Band::Standard, 150, 1, Some(7));
    while !h.s.is_idle() {
        h.step(0);
    }
    assert_eq!(h.hits, 96);
    assert_eq!(h.s.stats().prefix_hit_tokens, 96);
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// With a stream per slot: one request of `prompt` tokens (prefix group 7, whose prompts
/// share their first 100 tokens) runs to the end and stays in slot 0 as a cache entry;
/// then a second request of the group, as long, arrives.
fn one_cache_entry_then_its_group(prompt: u64) -> Harness {
    let mut cfg = config();
    cfg.adopt_cached_slots = true;
    let mut h = Harness::new(cfg);
    h.arrive_grouped("a", Band::Standard, prompt, 1, Some(7));
    while !h.s.is_idle() {
        h.step(0);
    }
    assert_eq!(h.cells.keys().copied().collect::<Vec<_>>(), [SeqSlot(0)]);
    h.arrive_grouped("a", Band::Standard, prompt, 1, Some(7));
    h
}

/// With a stream per slot, a request whose prefix sits in a cache entry starts in that
/// entry's slot, trimmed to the prefix, with no copy; other requests take the lowest free
/// slot, so the running ones stay consecutive.
#[test]
fn a_cached_prefix_is_taken_over_in_place_with_a_stream_per_slot() {
    let mut h = one_cache_entry_then_its_group(150);
    h.arrive("a", Band::Standard, 40, 1);
    h.now += 1_000_000;
    let plan = h.s.plan(Nanos(h.now));
    assert!(plan.copies.is_empty(), "{plan:?}");
    assert_eq!(plan.trim, [(SeqSlot(0), 96)]);
    let mut slots: Vec<SeqSlot> = plan.start.iter().map(|(_, s)| *s).collect();
    slots.sort();
    assert_eq!(slots, [SeqSlot(0), SeqSlot(1)]);
    h.execute_kv(&plan);
    assert_eq!(h.hits, 96);
    assert_eq!(h.s.stats().prefix_hit_tokens, 96);
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// An entry sharing only a short prefix with a new request is not taken over while a
/// slot is free: the request copies the prefix into a free slot and the entry keeps its
/// whole prompt (taking it over would have dropped two thirds of it).
#[test]
fn a_mostly_different_cache_entry_is_copied_from_not_taken_over() {
    let mut h = one_cache_entry_then_its_group(300);
    h.now += 1_000_000;
    let plan = h.s.plan(Nanos(h.now));
    assert!(plan.trim.is_empty(), "{plan:?}");
    assert_eq!(plan.copies.len(), 1, "{plan:?}");
    let copy = &plan.copies[0];
    assert_eq!((copy.from, copy.tokens), (SeqSlot(0), 96));
    assert_ne!(copy.to, SeqSlot(0));
    h.execute_kv(&plan);
    assert_eq!(h.hits, 96);
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// A tenant that fills the running batch gives up a place as soon as another tenant of
/// the same band waits: the newcomer's first token does not wait for the hog's requests
/// to finish. And a higher band takes a place from a lower one the same way.
#[test]
fn a_full_batch_makes_room_for_a_tenant_below_its_share_and_for_a_higher_band() {
    let mut cfg = config();
    cfg.max_waiting = 20;
    cfg.max_waiting_tokens = 10_000;
    let mut h = Harness::new(cfg);
    for _ in 0..6 {
        h.arrive("hog", Band::Standard, 20, 30);
    }
    for _ in 0..4 {
        h.step(0);
    }
    let running = |h: &Harness, t: &str| {
        h.live
            .iter()
            .filter(|id| h.tenant_of[*id] == t && h.s.is_running(**id))
            .count()
    };
    assert_eq!(running(&h, "hog"), 4, "the hog fills the batch");
    h.arrive("newcomer", Band::Standard, 20, 5);
    let first = h.live.iter().copied().max().expect("newcomer");
    let mut steps = 0;
    while !h.s.is_running(first) {
        h.step(0);
        steps += 1;
        assert!(steps <= 2, "the newcomer waited for the hog");
    }
    assert_eq!(running(&h, "hog"), 3);
    h.arrive("urgent", Band::Interactive, 20, 5);
    let urgent = h.live.iter().copied().max().expect("urgent");
    h.step(0);
    assert!(
        h.s.is_running(urgent),
        "a higher band takes a place at once"
    );
    assert_eq!(h.s.check_invariants(), Ok(()));
    while !h.s.is_idle() {
        h.step(0);
    }
    assert!(h.live.is_empty());
    assert!(h.ended.values().all(|n| *n == 1));
}

/// Requests of tenant `t` not ended yet.
fn in_flight(h: &Harness, t: &str) -> usize {
    h.live.iter().filter(|id| h.tenant_of[*id] == t).count()
}

/// Tenant A keeps 20 requests in flight; when `b`, tenant B keeps 2, each noted with the
/// step it arrived in.
fn flood_and_trickle(h: &mut Harness, b: bool, step: u64, waiting_b: &mut Vec<(RequestId, u64)>) {
    for _ in in_flight(h, "a")..20 {
        h.arrive("a", Band::Standard, 60, 32);
    }
    if b {
        for _ in in_flight(h, "b")..2 {
            h.arrive("b", Band::Standard, 60, 32);
            let id = *h.live.iter().max().expect("just arrived");
            waiting_b.push((id, step));
        }
    }
}

/// Move the waiting requests that got a running place (or ended) into `waits`, as the
/// steps they waited.
fn placed(h: &Harness, step: u64, waiting: &mut Vec<(RequestId, u64)>, waits: &mut Vec<u64>) {
    waiting.retain(|(id, at)| {
        let placed = h.s.is_running(*id) || !h.live.contains(id);
        if placed {
            waits.push(step - at);
        }
        !placed
    });
}

/// Room for a flood: 16 running places, deep queue, ample KV.
fn flood_config() -> SchedConfig {
    let mut cfg = config();
    cfg.max_waiting = 100;
    cfg.max_waiting_tokens = 100_000;
    cfg.kv_blocks = 400;
    cfg.slots = 40;
    cfg.max_running = 16;
    cfg.max_step_tokens = 512;
    cfg.max_prefill_chunk = 512;
    cfg
}

/// Noisy neighbour in the pure core: tenant A keeps 20 requests in flight against 16
/// running places, tenant B keeps 2; B's requests get a running place within two steps.
#[test]
fn a_quiet_tenant_next_to_a_flood_is_admitted_within_two_steps() {
    let mut h = Harness::new(flood_config());
    let mut waiting_b: Vec<(RequestId, u64)> = Vec::new();
    let mut waits = Vec::new();
    for step in 0..400u64 {
        flood_and_trickle(&mut h, step > 50, step, &mut waiting_b);
        h.step(0);
        placed(&h, step, &mut waiting_b, &mut waits);
    }
    assert!(waits.len() >= 15, "B was served: {} requests", waits.len());
    assert!(waits.iter().all(|w| *w <= 2), "B waited {waits:?} steps");
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// Tenant B has the server to itself for a while, goes quiet, and comes back while A
/// floods (20 requests in flight, 16 running places). B's service while alone is not held
/// against it: each of its requests gets a running place within two steps, and a step
/// that starts one of B's requests starts none of A's, so B's first token does not wait
/// for the flood's prompts.
#[test]
fn a_quiet_tenant_back_next_to_a_flood_starts_first_and_alone() {
    let mut h = Harness::new(flood_config());
    // B alone.
    for _ in 0..1000 {
        for _ in in_flight(&h, "b")..2 {
            h.arrive("b", Band::Standard, 60, 32);
        }
        h.step(0);
    }
    settle(&mut h);
    let mut waiting_b: Vec<(RequestId, u64)> = Vec::new();
    let mut waits = Vec::new();
    let mut b_starts = 0; // B's requests started
    for step in 0..300u64 {
        flood_and_trickle(&mut h, step > 2, step, &mut waiting_b);
        let queued: Vec<RequestId> = (h.live.iter())
            .filter(|id| !h.s.is_running(**id))
            .copied()
            .collect();
        h.step(0);
        let started: Vec<&str> = (queued.iter())
            .filter(|id| h.s.is_running(**id) || !h.live.contains(id))
            .map(|id| h.tenant_of[id].as_str())
            .collect();
        if started.contains(&"b") {
            b_starts += started.iter().filter(|t| **t == "b").count();
            assert!(!started.contains(&"a"), "step {step} started {started:?}");
        }
        placed(&h, step, &mut waiting_b, &mut waits);
    }
    assert!(
        b_starts >= 10,
        "B was served: {b_starts} of its requests started"
    );
    assert!(waits.iter().all(|w| *w <= 2), "B waited {waits:?} steps");
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// Tenant A floods (20 requests in flight), tenant B keeps 2 short requests in flight.
/// With `isolate_quiet_starts`, a step that starts one of B's requests computes nothing
/// of A's, nor does the step that computes the rest of its prompt, so B's first token
/// does not wait for A's decodes; A loses only those steps. Without it, B's requests
/// start beside A's decodes.
#[test]
fn a_quiet_tenants_request_starts_in_a_step_without_the_floods_streams() {
    for isolate in [true, false] {
        let mut cfg = flood_config();
        cfg.isolate_quiet_starts = isolate;
        let mut h = Harness::new(cfg);
        let (mut b_starts, mut beside_a, mut a_steps) = (0, 0, 0);
        let (mut waiting_b, mut waits) = (Vec::new(), Vec::new());
        let steps = 400u64;
        for step in 0..steps {
            flood_and_trickle(&mut h, step >= 20, step, &mut waiting_b);
            let queued_b: Vec<RequestId> = (h.live.iter())
                .filter(|id| h.tenant_of[*id] == "b" && !h.s.is_running(**id))
                .copied()
                .collect();
            let done = h.step(0);
            let a_worked = done.iter().any(|(id, _, _)| h.tenant_of[id] == "a");
            a_steps += u32::from(a_worked);
            if queued_b
                .iter()
                .any(|id| h.s.is_running(*id) || !h.live.contains(id))
            {
                b_starts += 1;
                beside_a += u32::from(a_worked);
            }
            placed(&h, step, &mut waiting_b, &mut waits);
        }
        assert!(
            waits.len() >= 20,
            "isolate {isolate}: B was served {waits:?}"
        );
        assert!(
            b_starts >= 10,
            "isolate {isolate}: {b_starts} steps started B"
        );
        assert!(waits.iter().all(|w| *w <= 2), "B waited {waits:?} steps");
        if isolate {
            assert_eq!(beside_a, 0, "B started beside A's work");
            // A waits for a start's step and for the one computing its prompt's tail.
            assert!(
                steps as u32 - a_steps <= 2 * b_starts,
                "A worked in {a_steps} of {steps} steps, B started in {b_starts}"
            );
        } else {
            assert!(
                beside_a >= b_starts - 1,
                "{beside_a} of {b_starts} beside A"
            );
        }
        assert_eq!(h.s.check_invariants(), Ok(()));
    }
}

/// B's requests come in pairs, the second a few steps after the first (its first token
/// out, decoding), while A floods: every step that computes any of B's prompts computes
/// nothing of A's. Before, the step with the tail of a B prompt started A's new requests
/// beside it (once charged for its first piece, B was no longer the least served), and,
/// with room in the batch, the second request started beside A's decodes (its tenant just
/// past A by the first prompt's charge). With room it starts at once; in a full batch a
/// place is made for it when A's counter passes B's again, within two steps.
#[test]
fn every_step_computing_a_quiet_tenants_prompts_is_its_own() {
    for (a_in_flight, max_wait) in [(20, 2), (12, 0)] {
        let mut h = Harness::new(flood_config());
        let mut b_prompt_steps = 0;
        let (mut waiting_b, mut waits) = (Vec::new(), Vec::new());
        for step in 0..400u64 {
            for _ in in_flight(&h, "a")..a_in_flight {
                h.arrive("a", Band::Standard, 60, 32);
            }
            if step >= 20 && (step % 40 == 0 || step % 40 == 3) {
                h.arrive("b", Band::Standard, 60, 8);
                waiting_b.push((*h.live.iter().max().expect("just arrived"), step));
            }
            let done = h.step(0);
            placed(&h, step, &mut waiting_b, &mut waits);
            if (done.iter()).any(|(id, _, decode)| h.tenant_of[id] == "b" && !decode) {
                b_prompt_steps += 1;
                let a: Vec<_> = (done.iter())
                    .filter(|(id, _, _)| h.tenant_of[id] == "a")
                    .collect();
                assert!(
                    a.is_empty(),
                    "A {a_in_flight}, step {step}: A's work beside B's prompt: {a:?}"
                );
            }
        }
        // Two requests a pair, each prompt in two steps (the tail is a piece of its own).
        assert!(
            b_prompt_steps >= 36,
            "{b_prompt_steps} steps computed B's prompts"
        );
        assert!(
            waits.len() >= 18 && waits.iter().all(|w| *w <= max_wait),
            "A {a_in_flight}: B waited {waits:?} steps"
        );
        assert_eq!(h.s.check_invariants(), Ok(()));
    }
}

/// Run until nothing is waiting or running.
fn settle(h: &mut Harness) {
    let mut steps = 0;
    while !h.s.is_idle() {
        h.step(0);
        steps += 1;
        assert!(steps < 10_000, "did not settle");
    }
}

/// Tenant "small" caches a prefix; tenant "flood" then runs ten long distinct prompts
/// through the pool; "small" asks again. Returns the prompt tokens its repeat reused.
fn small_prefix_after_a_flood(quotas: &[(&str, KvQuota)]) -> u64 {
    let mut cfg = config();
    cfg.max_waiting = 20;
    cfg.max_waiting_tokens = 10_000;
    for (t, q) in quotas {
        cfg.kv_quotas.insert(TenantId((*t).into()), *q);
    }
    let mut h = Harness::new(cfg.clone());
    h.arrive_grouped("small", Band::Standard, 150, 1, Some(7));
    settle(&mut h);
    for _ in 0..10 {
        h.arrive("flood", Band::Standard, 300, 4);
    }
    while !h.s.is_idle() {
        h.step(0);
        if let Some(cap) = cfg
            .kv_quotas
            .get(&TenantId("flood".into()))
            .and_then(|q| q.max_blocks)
        {
            assert!(h.s.kv_blocks_of(&TenantId("flood".into())) <= cap);
        }
    }
    let before = h.hits;
    h.arrive_grouped("small", Band::Standard, 150, 1, Some(7));
    settle(&mut h);
    assert_eq!(h.s.check_invariants(), Ok(()));
    assert!(h.live.is_empty(), "every request ended");
    h.hits - before
}

/// Without quotas the flood's cache entries push the small tenant's prefix out (plain
/// LRU); a cap on the flood, or a floor for the small tenant, keeps it.
#[test]
fn a_cap_on_a_flood_or_a_floor_for_its_neighbour_keeps_the_neighbours_prefix() {
    assert_eq!(small_prefix_after_a_flood(&[]), 0, "evicted without quotas");
    let cap = KvQuota {
        max_blocks: Some(24),
        min_blocks: 0,
    };
    assert_eq!(
        small_prefix_after_a_flood(&[("flood", cap)]),
        96,
        "kept under a cap on the flood"
    );
    let floor = KvQuota {
        max_blocks: None,
        min_blocks: 12,
    };
    assert_eq!(
        small_prefix_after_a_flood(&[("small", floor)]),
        96,
        "kept by the small tenant's floor"
    );
}

/// A tenant within its floor gets KV at once even when another tenant's running
/// sequences hold the whole pool: one of them is preempted for it.
#[test]
fn a_tenant_within_its_floor_displaces_running_sequences_of_others() {
    let waited = |floor: u32| {
        let mut cfg = config();
        cfg.max_running = 8;
        cfg.max_waiting = 20;
        cfg.max_waiting_tokens = 10_000;
        cfg.kv_quotas.insert(
            TenantId("small".into()),
            KvQuota {
                max_blocks: None,
                min_blocks: floor,
            },
        );
        let mut h = Harness::new(cfg);
        for _ in 0..3 {
            h.arrive("flood", Band::Standard, 200, 250);
        }
        for _ in 0..30 {
            h.step(0);
        }
        assert!(h.s.blocks().free_count() < 10, "the flood holds the pool");
        h.arrive("small", Band::Standard, 100, 4);
        let id = *h.live.iter().max().expect("small");
        let mut steps = 0;
        while !h.s.is_running(id) && h.live.contains(&id) {
            h.step(0);
            steps += 1;
        }
        settle(&mut h);
        assert_eq!(h.s.check_invariants(), Ok(()));
        steps
    };
    let with_floor = waited(12);
    let without = waited(0);
    assert!(
        with_floor <= 1,
        "within its floor it waited {with_floor} steps"
    );
    assert!(
        without > 5,
        "without a floor it waits for the flood ({without} steps)"
    );
}

/// A cap is the tenant's longest sequence: a prompt that cannot fit is refused, a
/// request that can is given at most the rest as output.
#[test]
fn a_cap_bounds_one_sequence() {
    let mut cfg = config();
    cfg.kv_quotas.insert(
        TenantId("capped".into()),
        KvQuota {
            max_blocks: Some(8),
            min_blocks: 0,
        },
    );
    let mut s = Scheduler::new(cfg);
    let req = |id, prompt, max_new| SchedRequest {
        id: RequestId(id),
        tenant: TenantId("capped".into()),
        band: Band::Standard,
        weight: 1,
        prompt: Tokens(prompt),
        max_new: Tokens(max_new),
        arrival: Nanos(0),
        slo: Slo::default(),
        block_hashes: Vec::new(),
    };
    let err = s
        .admit(Nanos(0), req(1, 128, 4))
        .expect_err("128 tokens fill 8 blocks");
    assert!(
        matches!(
            err,
            tokenfab_sched::Rejection::OverKvQuota {
                limit: Tokens(128),
                ..
            }
        ),
        "{err:?}"
    );
    s.admit(Nanos(0), req(2, 100, 200)).expect("fits");
    let mut generated = 0;
    let mut t = 0;
    while !s.is_idle() {
        t += 1_000_000;
        let plan = s.plan(Nanos(t));
        let sampled: Vec<_> = plan
            .work
            .iter()
            .filter(|w| w.sample)
            .map(|w| (w.id, false))
            .collect();
        generated += sampled.len();
        s.complete(
            Nanos(t),
            &StepResult {
                sampled,
                elapsed: Nanos(1_000_000),
            },
        );
        assert!(s.kv_blocks_of(&TenantId("capped".into())) <= 8);
    }
    assert_eq!(
        generated, 28,
        "max_new clamped to the cap's 128 tokens less the prompt"
    );
}

/// SLO admission predicts TTFT from the prompt the cache does not hold: a repeat of a
/// cached prefix is admitted under a target that the same prompt cold would miss.
#[test]
fn slo_admission_counts_only_the_uncached_prompt() {
    let mut cfg = config();
    // Whole-prompt steps, so the prefill rate is learned from the first request.
    cfg.max_step_tokens = 512;
    cfg.max_prefill_chunk = 512;
    let mut h = Harness::new(cfg);
    // Learns the prefill rate (toy model: 0.25 ms per prompt token) and caches group 7.
    h.arrive_grouped("a", Band::Standard, 300, 1, Some(7));
    settle(&mut h);
    let prompt = |group: i32| -> Vec<TokenId> {
        (0..120)
            .map(|k| {
                if k < 100 {
                    TokenId(group * 1000 + k)
                } else {
                    TokenId(-9000 - k)
                }
            })
            .collect()
    };
    let req = |id, group| SchedRequest {
        id: RequestId(id),
        tenant: TenantId("a".into()),
        band: Band::Standard,
        weight: 1,
        prompt: Tokens(120),
        max_new: Tokens(1),
        arrival: Nanos(h.now),
        // 120 tokens cold ≈ 30 ms; with 96 of them cached ≈ 6 ms.
        slo: Slo {
            ttft: Some(Nanos::from_millis(15)),
            tpot: None,
        },
        block_hashes: prefix_hashes("a", &prompt(group), 16),
    };
    let cold = h.s.admit(Nanos(h.now), req(1000, 8));
    assert!(
        matches!(cold, Err(tokenfab_sched::Rejection::SloUnattainable { .. })),
        "{cold:?}"
    );
    let warm = h.s.admit(Nanos(h.now), req(1001, 7));
    assert!(warm.is_ok(), "{warm:?}");
}
