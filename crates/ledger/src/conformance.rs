//! The conformance suite every [`LedgerStore`] must pass (memory, SQLite, PostgreSQL).
//! Each check panics with a message on failure; tests call [`run_all`] per store.

use crate::model::{
    AttemptId, GroupBy, KeyRecord, KeySpec, Outcome, Reservation, Settlement, TokenUsage,
    UsageQuery,
};
use crate::price::Price;
use crate::store::{Idempotency, IdempotencyClaim, LedgerError, LedgerStore};
use crate::{new_key, secret};
use std::sync::Arc;
use tokenfab_types::{NanoUsd, TenantId, Tokens};

const DAY1: i64 = 1_795_392_000; // 2026-11-23T00:00:00Z

/// A price that makes arithmetic easy: 1,000 nano-USD per prompt token, 500 per cached
/// token, 2,000 per completion token.
pub fn test_price() -> Price {
    Price {
        prompt: NanoUsd(1_000_000_000),
        cached: NanoUsd(500_000_000),
        completion: NanoUsd(2_000_000_000),
    }
}

pub fn reservation(key: &KeyRecord, request: &str, prompt: u64, max: u64) -> Reservation {
    Reservation {
        id: AttemptId::new(request, 0),
        node: "node-a".into(),
        key_id: key.id.clone(),
        tenant: key.tenant.clone(),
        model: "m1".into(),
        prompt: Tokens(prompt),
        max_completion: Tokens(max),
        price: test_price(),
        now: DAY1,
        x_request_id: Some(format!("x-{request}")),
    }
}

fn usage(prompt: u64, cached: u64, completion: u64) -> TokenUsage {
    TokenUsage {
        prompt: Tokens(prompt),
        cached: Tokens(cached),
        completion: Tokens(completion),
    }
}

fn done(u: TokenUsage) -> Settlement {
    Settlement {
        usage: u,
        outcome: Outcome::Completed,
        now: DAY1 + 1,
    }
}

async fn make_key(store: &dyn LedgerStore, tenant: &str, budget: Option<u64>) -> KeyRecord {
    let mut spec = KeySpec::new(TenantId(tenant.into()));
    spec.budget = budget.map(NanoUsd);
    let (rec, _) = new_key(&spec, DAY1, &mut rand::thread_rng());
    store.create_key(&rec).await.expect("create key");
    store
        .key(&rec.id)
        .await
        .expect("read key")
        .expect("key exists")
}

pub async fn keys_lifecycle(store: &dyn LedgerStore) {
    let mut spec = KeySpec::new(TenantId("acme".into()));
    spec.rpm = Some(60);
    spec.tpm = Some(10_000);
    spec.max_concurrency = Some(4);
    spec.budget = Some(NanoUsd(5_000));
    spec.weight = 3;
    let (rec, text) = new_key(&spec, DAY1, &mut rand::thread_rng());
    store.create_key(&rec).await.expect("create");
    let got = store.key(&rec.id).await.expect("get").expect("exists");
    assert_eq!(got, rec, "a key reads back as written");
    let (id, sec) = secret::parse(&text).expect("parse");
    assert_eq!(id, rec.id);
    assert!(secret::verify(sec, &got.hash));
    let other = make_key(store, "globex", None).await;
    let acme = store
        .list_keys(Some(&TenantId("acme".into())))
        .await
        .expect("list");
    assert!(acme.iter().any(|k| k.id == rec.id));
    assert!(acme.iter().all(|k| k.tenant.0 == "acme"));
    let all = store.list_keys(None).await.expect("list all");
    assert!(all.iter().any(|k| k.id == other.id));
    let rotated = secret::regenerate(&rec.id, &mut rand::thread_rng());
    assert!(store
        .rotate_key(&rec.id, rotated.hash)
        .await
        .expect("rotate"));
    let got = store.key(&rec.id).await.expect("get").expect("exists");
    assert!(
        !secret::verify(sec, &got.hash),
        "the old secret stops working"
    );
    assert!(store.revoke_key(&rec.id, DAY1 + 5).await.expect("revoke"));
    assert!(
        store
            .key(&rec.id)
            .await
            .expect("get")
            .expect("exists")
            .revoked
    );
    assert!(!store.rotate_key(&rec.id, [1; 32]).await.expect("rotate"));
    assert!(!store
        .revoke_key("nope00000000", DAY1)
        .await
        .expect("revoke"));
    let r = reservation(&rec, "after-revoke", 1, 1);
    assert_eq!(
        store.reserve(&r).await,
        Err(LedgerError::Revoked(rec.id.clone()))
    );
    let mut ghost = r.clone();
    ghost.key_id = "000000000000".into();
    assert!(matches!(
        store.reserve(&ghost).await,
        Err(LedgerError::UnknownKey(_))
    ));
}

pub async fn try_confirm_cancel(store: &dyn LedgerStore) {
    // Budget for one request of 10 prompt + 5 completion tokens: 10*1000 + 5*2000.
    let key = make_key(store, "tcc", Some(20_000)).await;
    let r = reservation(&key, "tcc-1", 10, 5);
    assert_eq!(r.amount(), NanoUsd(20_000));
    store.reserve(&r).await.expect("fits exactly");
    // A reserve holds the budget at once for every other reserve, but may become durable
    // (and visible to plain reads) with the next commit; progress returns after it.
    store
        .progress(&r.id, TokenUsage::default())
        .await
        .expect("progress");
    let k = store.key(&key.id).await.expect("get").expect("exists");
    assert_eq!((k.reserved, k.spent), (NanoUsd(20_000), NanoUsd(0)));
    let second = reservation(&key, "tcc-2", 1, 0);
    assert_eq!(
        store.reserve(&second).await,
        Err(LedgerError::InsufficientBudget {
            needed: NanoUsd(1_000),
            remaining: NanoUsd(0)
        })
    );
    assert_eq!(
        store.reserve(&r).await,
        Err(LedgerError::DuplicateReservation(r.id.clone())),
        "a reservation id is used once"
    );
    // 10 prompt of which 4 cached, 2 completion: 6*1000 + 4*500 + 2*2000 = 12_000.
    let settled = store
        .settle(&r.id, done(usage(10, 4, 2)))
        .await
        .expect("settle");
    assert_eq!(settled.cost, NanoUsd(12_000));
    assert_eq!(settled.held, NanoUsd(20_000));
    assert_eq!(
        store.settle(&r.id, done(usage(10, 0, 5))).await,
        Err(LedgerError::NotOpen(r.id.clone())),
        "a reservation ends exactly once"
    );
    let k = store.key(&key.id).await.expect("get").expect("exists");
    assert_eq!((k.reserved, k.spent), (NanoUsd(0), NanoUsd(12_000)));
    assert_eq!(k.remaining(), Some(NanoUsd(8_000)));
    // Cancel: nothing served, nothing charged.
    let c = reservation(&key, "tcc-3", 3, 1);
    store.reserve(&c).await.expect("fits");
    let s = store
        .settle(&c.id, done(TokenUsage::default()))
        .await
        .expect("cancel");
    assert_eq!(s.cost, NanoUsd(0));
    let k = store.key(&key.id).await.expect("get").expect("exists");
    assert_eq!((k.reserved, k.spent), (NanoUsd(0), NanoUsd(12_000)));
    assert_eq!(
        store.progress(&c.id, usage(1, 0, 1)).await,
        Err(LedgerError::NotOpen(c.id.clone()))
    );
}

pub async fn crash_recovery(store: &dyn LedgerStore) {
    let key = make_key(store, "crash", None).await;
    let a = reservation(&key, "rec-a", 100, 50);
    let b = reservation(&key, "rec-b", 100, 50);
    let mut other_node = reservation(&key, "rec-c", 100, 50);
    other_node.node = "node-b".into();
    for r in [&a, &b, &other_node] {
        store.reserve(r).await.expect("reserve");
    }
    store
        .progress(&a.id, usage(100, 0, 7))
        .await
        .expect("progress");
    let before = store.open_reservations().await.expect("count");
    let rec = store.recover("node-a", DAY1 + 9).await.expect("recover");
    assert_eq!((rec.confirmed, rec.released), (1, 1));
    assert_eq!(
        store.open_reservations().await.expect("count"),
        before - 2,
        "node-b's reservation is not node-a's to resolve"
    );
    let again = store.recover("node-a", DAY1 + 10).await.expect("recover");
    assert_eq!((again.confirmed, again.released), (0, 0), "resolved once");
    let k = store.key(&key.id).await.expect("get").expect("exists");
    assert_eq!(k.spent, NanoUsd(100 * 1000 + 7 * 2000));
    assert_eq!(k.reserved, other_node.amount());
    store
        .settle(&other_node.id, done(usage(100, 0, 50)))
        .await
        .expect("settle");
    let rows = store
        .usage(&UsageQuery {
            tenant: Some(TenantId("crash".into())),
            key_id: None,
            since: None,
            group_by: GroupBy::Tenant,
        })
        .await
        .expect("usage");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].requests, 3);
    assert_eq!(rows[0].completion_tokens, 57);
    assert_eq!(rows[0].prompt_tokens, 200);
}

pub async fn usage_queries(store: &dyn LedgerStore) {
    let k1 = make_key(store, "usage-t", None).await;
    let k2 = make_key(store, "usage-t", None).await;
    let k3 = make_key(store, "usage-other", None).await;
    let cases = [
        (&k1, "u1", "m1", DAY1, usage(10, 2, 3)),
        (&k1, "u2", "m2", DAY1 + 86_400, usage(20, 0, 4)),
        (&k2, "u3", "m1", DAY1 + 86_400, usage(30, 30, 5)),
        (&k3, "u4", "m1", DAY1, usage(1000, 0, 1000)),
    ];
    for (key, id, model, now, u) in cases {
        let mut r = reservation(key, id, u.prompt.0, u.completion.0);
        r.model = model.into();
        r.now = now;
        store.reserve(&r).await.expect("reserve");
        store.settle(&r.id, done(u)).await.expect("settle");
    }
    let q = |group_by, key_id: Option<&str>, since| UsageQuery {
        tenant: Some(TenantId("usage-t".into())),
        key_id: key_id.map(str::to_owned),
        since,
        group_by,
    };
    let by_model = store
        .usage(&q(GroupBy::Model, None, None))
        .await
        .expect("q");
    let summary: Vec<_> = by_model
        .iter()
        .map(|r| {
            (
                r.group.as_str(),
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
            )
        })
        .collect();
    assert_eq!(summary, vec![("m1", 2, 40, 8), ("m2", 1, 20, 4)]);
    let m1_cost = 8 * 1000 + 2 * 500 + 3 * 2000 + 30 * 500 + 5 * 2000;
    assert_eq!(by_model[0].cost_nano_usd, m1_cost);
    assert_eq!(by_model[0].cached_tokens, 32);
    let by_day = store.usage(&q(GroupBy::Day, None, None)).await.expect("q");
    let days: Vec<_> = by_day
        .iter()
        .map(|r| (r.group.as_str(), r.requests))
        .collect();
    assert_eq!(days, vec![("2026-11-23", 1), ("2026-11-24", 2)]);
    let since = store
        .usage(&q(GroupBy::Key, None, Some(DAY1 + 1)))
        .await
        .expect("q");
    assert_eq!(since.iter().map(|r| r.requests).sum::<u64>(), 2);
    let one_key = store
        .usage(&q(GroupBy::Key, Some(&k2.id), None))
        .await
        .expect("q");
    assert_eq!(one_key.len(), 1);
    assert_eq!(one_key[0].group, k2.id);
}

/// `attempts` concurrent reservations against a budget that covers exactly `fits` of
/// them, spread over `stores` (several handles on one database stand for several
/// processes): exactly `fits` succeed, and the books balance after settling.
pub async fn budget_race(stores: &[Arc<dyn LedgerStore>], attempts: usize, fits: u64) {
    let first = &stores[0];
    let per = 3 * 1000 + 2 * 2000;
    let key = make_key(first.as_ref(), "race", Some(per * fits)).await;
    let mut tasks = Vec::new();
    for n in 0..attempts {
        let store = stores[n % stores.len()].clone();
        let r = reservation(&key, &format!("race-{n}"), 3, 2);
        tasks.push(tokio::spawn(async move {
            let ok = store.reserve(&r).await;
            if ok.is_ok() {
                store
                    .settle(&r.id, done(usage(3, 0, 2)))
                    .await
                    .expect("settle");
            }
            ok
        }));
    }
    let mut won = 0u64;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => won += 1,
            Err(LedgerError::InsufficientBudget { .. }) => {}
            Err(e) => panic!("unexpected error in the race: {e}"),
        }
    }
    assert_eq!(won, fits, "exactly the budgeted number of requests succeed");
    let k = first.key(&key.id).await.expect("get").expect("exists");
    assert_eq!(k.spent, NanoUsd(per * fits));
    assert_eq!(k.reserved, NanoUsd(0));
}

pub async fn idempotency(store: &dyn LedgerStore) {
    let claim = |tenant: &str, key: &str, body: u8, node: &str| IdempotencyClaim {
        tenant: TenantId(tenant.into()),
        key: key.into(),
        body: [body; 32],
        node: node.into(),
        now: DAY1,
    };
    let c = claim("idem-a", "k1", 1, "node-a");
    assert_eq!(store.idempotency_claim(&c).await, Ok(Idempotency::Claimed));
    assert_eq!(store.idempotency_claim(&c).await, Ok(Idempotency::InFlight));
    assert_eq!(
        store
            .idempotency_claim(&claim("idem-a", "k1", 2, "node-a"))
            .await,
        Ok(Idempotency::Mismatch)
    );
    assert_eq!(
        store
            .idempotency_claim(&claim("idem-b", "k1", 2, "node-a"))
            .await,
        Ok(Idempotency::Claimed),
        "keys are per tenant"
    );
    store
        .idempotency_complete(&c.tenant, "k1", b"{\"ok\":1}")
        .await
        .expect("complete");
    assert_eq!(
        store.idempotency_claim(&c).await,
        Ok(Idempotency::Done(b"{\"ok\":1}".to_vec()))
    );
    store
        .idempotency_release(&c.tenant, "k1")
        .await
        .expect("release");
    assert!(
        matches!(store.idempotency_claim(&c).await, Ok(Idempotency::Done(_))),
        "a finished key is never released"
    );
    let failed = claim("idem-a", "k2", 3, "node-a");
    assert_eq!(
        store.idempotency_claim(&failed).await,
        Ok(Idempotency::Claimed)
    );
    store
        .idempotency_release(&failed.tenant, "k2")
        .await
        .expect("release");
    assert_eq!(
        store.idempotency_claim(&failed).await,
        Ok(Idempotency::Claimed),
        "a failed request may be retried"
    );
    // A crash leaves the claim running; the node's next start drops it.
    store.recover("node-a", DAY1).await.expect("recover");
    assert_eq!(
        store.idempotency_claim(&failed).await,
        Ok(Idempotency::Claimed)
    );
}

/// Every check above, on one store.
pub async fn run_all(store: Arc<dyn LedgerStore>) {
    keys_lifecycle(store.as_ref()).await;
    try_confirm_cancel(store.as_ref()).await;
    crash_recovery(store.as_ref()).await;
    usage_queries(store.as_ref()).await;
    idempotency(store.as_ref()).await;
    budget_race(std::slice::from_ref(&store), 1000, 20).await;
}
