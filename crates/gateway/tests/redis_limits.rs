//! Rate limits kept in a real Redis server and shared by several gateway replicas (each
//! replica is one `Limiter` with its own connection): the limit holds across all of them,
//! exactly, under concurrency.

use std::sync::Arc;
use tokenfab_gateway::testkit::redis_or_skip;
use tokenfab_gateway::Limiter;
use tokenfab_ledger::{new_key, KeyRecord, KeySpec};
use tokenfab_types::{ErrorCode, TenantId};

fn key(rpm: Option<u64>, tpm: Option<u64>, concurrency: Option<u64>) -> KeyRecord {
    let mut spec = KeySpec::new(TenantId("t".into()));
    spec.rpm = rpm;
    spec.tpm = tpm;
    spec.max_concurrency = concurrency;
    new_key(&spec, 0, &mut rand::thread_rng()).0
}

async fn replicas(url: &str, n: usize) -> Vec<Arc<Limiter>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(
            Limiter::redis(url).await.expect("connect to Redis"),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_minute_hold_exactly_across_replicas() {
    let Some(redis) = redis_or_skip("requests_per_minute_hold_exactly_across_replicas") else {
        return;
    };
    let limiters = replicas(&redis.url(), 3).await;
    let k = Arc::new(key(Some(10), None, None));
    let mut tasks = Vec::new();
    for n in 0..300 {
        let (l, k) = (limiters[n % 3].clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            l.acquire(&k, 5, &format!("r{n}")).await
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(info) => {
                ok += 1;
                assert_eq!(info.requests.map(|r| r.0), Some(10), "limit reported");
            }
            Err(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                assert!(e.retry_after.is_some(), "429 carries Retry-After");
                let rate = e.rate.expect("x-ratelimit-* on a 429");
                assert_eq!(rate.requests.map(|r| r.1), Some(0), "none remaining");
                limited += 1;
            }
        }
    }
    assert_eq!(
        (ok, limited),
        (10, 290),
        "one limit of 10 per minute shared by three replicas (each alone would allow 10)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_and_token_refunds_are_shared_between_replicas() {
    let Some(redis) = redis_or_skip("concurrency_and_token_refunds_are_shared_between_replicas")
    else {
        return;
    };
    let l = replicas(&redis.url(), 2).await;
    let k = key(None, Some(100), Some(2));
    l[0].acquire(&k, 60, "a").await.expect("fits");
    let e = l[1]
        .acquire(&k, 60, "b")
        .await
        .expect_err("only 40 tokens left");
    assert!(e.message.contains("tokens per minute"), "{}", e.message);
    // `a` used 10 of its 60: the other replica sees the refund.
    l[0].release(&k, "a", 50).await;
    l[1].acquire(&k, 60, "b").await.expect("refund made room");
    l[0].acquire(&k, 1, "c").await.expect("second concurrent");
    let e = l[1]
        .acquire(&k, 1, "d")
        .await
        .expect_err("third concurrent");
    assert!(e.message.contains("concurrent"), "{}", e.message);
    l[1].release(&k, "b", 0).await;
    l[0].acquire(&k, 1, "d")
        .await
        .expect("a slot freed on the other replica");
    l[1].release(&k, "c", 0).await;
    l[1].release(&k, "d", 0).await;
    let e = l[0]
        .acquire(&k, 101, "e")
        .await
        .expect_err("larger than the limit");
    assert!(e.message.contains("too large"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_admitted_when_redis_goes_away() {
    let Some(mut redis) = redis_or_skip("requests_are_admitted_when_redis_goes_away") else {
        return;
    };
    let l = Limiter::redis(&redis.url()).await.expect("connect");
    let k = key(Some(1), None, None);
    l.acquire(&k, 1, "a").await.expect("first");
    assert!(
        l.acquire(&k, 1, "b").await.is_err(),
        "limited while Redis is up"
    );
    redis.stop();
    let info = tokio::time::timeout(std::time::Duration::from_secs(10), l.acquire(&k, 1, "c"))
        .await
        .expect("no hang when Redis is gone")
        .expect("fails open: the ledger, not Redis, guards money");
    assert_eq!(info.requests, None, "no rate headers without counters");
}
