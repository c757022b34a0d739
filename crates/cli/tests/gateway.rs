//! The multi-tenant gateway over a real engine: keys, limits, budgets, usage, isolation,
//! and ledger parity with what the engine handed out.

mod common;

use common::{call, chat_body, client, config, get, serve, MODEL};
use serde_json::{json, Value};
use std::time::Duration;
use tokenfab::config::{Config, PriceConfig, TenantKvConfig};

const ADMIN: &str = "test-admin-key-0123456789";

fn keyed(mut c: Config) -> Config {
    c.gateway.admin_key = ADMIN.into();
    c
}

/// A price on prompt tokens only, so a request's cost is known before it runs and equals
/// its reservation (1 USD per million prompt tokens = 1,000 nano-USD per token).
fn prompt_priced(mut c: Config) -> Config {
    c.prices.insert(
        MODEL.into(),
        PriceConfig {
            prompt_usd_per_mtok: 1.0,
            cached_usd_per_mtok: 1.0,
            completion_usd_per_mtok: 0.0,
        },
    );
    c
}

async fn create_key(url: &str, spec: Value) -> (String, String) {
    common::create_key(url, ADMIN, spec).await
}

fn short(extra: Value) -> Value {
    let mut e = json!({"max_tokens": 2, "temperature": 0});
    if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
        for (k, v) in x {
            o.insert(k.clone(), v.clone());
        }
    }
    chat_body("Say hi.", e)
}

fn code(v: &Value) -> String {
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_and_limits_refuse_with_documented_statuses() {
    let mut cfg = keyed(prompt_priced(config()));
    cfg.server.max_body_bytes = 64 << 10;
    let url = serve(cfg).await;
    let (_, good) = create_key(&url, json!({"tenant": "acme"})).await;
    let (revoked_id, revoked) = create_key(&url, json!({"tenant": "acme"})).await;
    let (_, rpm) = create_key(&url, json!({"tenant": "acme", "rpm": 2})).await;
    let (_, tpm) = create_key(&url, json!({"tenant": "acme", "tpm": 200})).await;
    let (_, conc) = create_key(&url, json!({"tenant": "acme", "max_concurrency": 1})).await;
    let (_, poor) = create_key(&url, json!({"tenant": "acme", "budget_usd": 0.000001})).await;
    let (_, batch) = create_key(&url, json!({"tenant": "acme", "priority": "batch"})).await;
    let r = client()
        .delete(format!("{url}/admin/v1/keys/{revoked_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status().as_u16(), 200);

    let ok = call(&url, Some(&good), &short(json!({})), &[]).await;
    assert_eq!(ok.status().as_u16(), 200, "a good key works");
    assert!(ok.headers().contains_key("x-request-id"));

    let wrong_secret = format!("{}0", &good[..good.len() - 1]);
    let wrong_secret = if wrong_secret == good {
        format!("{}1", &good[..good.len() - 1])
    } else {
        wrong_secret
    };
    // (what, key, body, headers, status, error code)
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Value,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "missing key",
            None,
            short(json!({})),
            vec![],
            401,
            "invalid_api_key",
        ),
        (
            "wrong secret",
            Some(&wrong_secret),
            short(json!({})),
            vec![],
            401,
            "invalid_api_key",
        ),
        (
            "not a key",
            Some("sk-something"),
            short(json!({})),
            vec![],
            401,
            "invalid_api_key",
        ),
        (
            "revoked key",
            Some(&revoked),
            short(json!({})),
            vec![],
            401,
            "invalid_api_key",
        ),
        (
            "over budget",
            Some(&poor),
            short(json!({})),
            vec![],
            429,
            "insufficient_quota",
        ),
        (
            "over TPM in one request",
            Some(&tpm),
            short(json!({"max_tokens": 500})),
            vec![],
            429,
            "rate_limit_exceeded",
        ),
        (
            "priority above the key's",
            Some(&batch),
            short(json!({})),
            vec![("x-tokenfab-priority", "interactive")],
            403,
            "permission_denied",
        ),
        (
            "bad cache scope",
            Some(&good),
            short(json!({})),
            vec![("x-tokenfab-cache-scope", "no spaces")],
            400,
            "",
        ),
    ];
    for (what, key, body, headers, status, want) in cases {
        let r = call(&url, key, &body, &headers).await;
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: Value = r.json().await.expect("error envelope");
        assert!(v["error"]["message"].as_str().is_some(), "{what}: {v}");
        if !want.is_empty() {
            assert_eq!(code(&v), want, "{what}: {v}");
        }
    }
    // Over RPM: two pass, the third is refused with OpenAI's headers.
    for _ in 0..2 {
        assert_eq!(
            call(&url, Some(&rpm), &short(json!({})), &[])
                .await
                .status(),
            200
        );
    }
    let r = call(&url, Some(&rpm), &short(json!({})), &[]).await;
    assert_eq!(r.status().as_u16(), 429, "third request within a minute");
    for h in [
        "retry-after",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ] {
        assert!(r.headers().contains_key(h), "missing {h}");
    }
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(code(&r.json().await.expect("json")), "rate_limit_exceeded");
    // Over concurrency: hold one stream open, the second is refused.
    let held = call(
        &url,
        Some(&conc),
        &chat_body(
            "Count to fifty.",
            json!({"max_tokens": 200, "stream": true}),
        ),
        &[],
    )
    .await;
    assert_eq!(held.status(), 200);
    let r = call(&url, Some(&conc), &short(json!({})), &[]).await;
    assert_eq!(r.status().as_u16(), 429, "second concurrent request");
    drop(held);
    // Malformed JSON and an oversized body with a good key.
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&good)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(code(&r.json().await.expect("json")), "invalid_json");
    let big = chat_body(&"x".repeat(100 << 10), json!({}));
    let r = call(&url, Some(&good), &big, &[]).await;
    assert_eq!(r.status().as_u16(), 413);
    // Unauthenticated body errors never leak past auth: no key → 401 even for bad JSON.
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    // Admin routes: a tenant key is forbidden, no key is unauthorised.
    assert_eq!(get(&url, "/admin/v1/keys", Some(&good)).await.0, 403);
    assert_eq!(get(&url, "/admin/v1/keys", None).await.0, 401);
    let (s, v) = get(&url, "/admin/v1/keys?tenant=acme", Some(ADMIN)).await;
    assert_eq!(s, 200);
    let listed = v["data"].as_array().expect("list");
    assert_eq!(listed.len(), 7);
    assert!(
        listed
            .iter()
            .all(|k| k.get("key").is_none() && k.get("hash").is_none()),
        "secrets never listed"
    );
    let (s, v) = get(&url, "/admin/v1/usage?group_by=week", Some(ADMIN)).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("group_by")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_and_admin_api_disabled_without_admin_key() {
    let url = serve(keyed(config())).await;
    let (id, old) = create_key(&url, json!({"tenant": "rot"})).await;
    let r = client()
        .post(format!("{url}/admin/v1/keys/{id}/rotate"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("rotate");
    let new = r.json::<Value>().await.expect("json")["key"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_eq!(
        call(&url, Some(&old), &short(json!({})), &[])
            .await
            .status(),
        401
    );
    assert_eq!(
        call(&url, Some(&new), &short(json!({})), &[])
            .await
            .status(),
        200
    );
    let open = serve(config()).await;
    assert_eq!(get(&open, "/admin/v1/keys", Some(ADMIN)).await.0, 404);
    assert_eq!(get(&open, "/admin/v1/usage", None).await.0, 404);
}

/// A budget covering exactly 20 requests, 1,000 concurrent requests, the durable SQLite
/// ledger: exactly 20 succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budget_race_admits_exactly_what_the_budget_covers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = keyed(prompt_priced(config()));
    cfg.gateway.ledger = dir.path().join("ledger.db").display().to_string();
    cfg.scheduler.max_waiting = 2000;
    let url = serve(cfg).await;
    let (_, probe) = create_key(&url, json!({"tenant": "probe"})).await;
    let r = call(&url, Some(&probe), &short(json!({"max_tokens": 1})), &[]).await;
    let prompt = r.json::<Value>().await.expect("json")["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    // 1,000 nano-USD per prompt token; USD with nine decimals is exact.
    let budget = 20.0 * prompt as f64 * 1e-6;
    let (key_id, key) = create_key(&url, json!({"tenant": "race", "budget_usd": budget})).await;
    let body = short(json!({"max_tokens": 1}));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (url, key, body) = (url.clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = call(&url, Some(&key), &body, &[]).await;
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                code(&v),
                v["error"]["message"].as_str().unwrap_or("").to_owned(),
            )
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, _, _) => ok += 1,
            (429, c, _) if c == "insufficient_quota" => {}
            other => panic!("unexpected answer in the race: {other:?}"),
        }
    }
    assert_eq!(ok, 20, "exactly the budgeted number of requests succeed");
    let (_, v) = get(&url, "/admin/v1/keys?tenant=race", Some(ADMIN)).await;
    let k = &v["data"][0];
    assert_eq!(k["id"], key_id);
    assert_eq!(
        k["spent"], k["budget"],
        "the whole budget is spent, not more"
    );
    assert_eq!(k["reserved"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_are_isolated_in_usage_and_prefix_cache() {
    let url = serve(keyed(config())).await;
    let (_, a) = create_key(&url, json!({"tenant": "tenant-a"})).await;
    let (_, b) = create_key(&url, json!({"tenant": "tenant-b"})).await;
    let system = "You are the harbour master of a small island. ".repeat(30);
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "When is high tide?"}],
        "max_tokens": 2, "temperature": 0,
    });
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let first: Value = call(&url, Some(&a), &body, &[])
        .await
        .json()
        .await
        .expect("json");
    let again: Value = call(&url, Some(&a), &body, &[])
        .await
        .json()
        .await
        .expect("json");
    let other: Value = call(&url, Some(&b), &body, &[])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(cached(&first), Some(0));
    assert!(
        cached(&again) > Some(256),
        "tenant A reuses its own prefix: {again}"
    );
    assert_eq!(
        cached(&other),
        Some(0),
        "tenant B learns nothing of A's cache"
    );
    // Both opt into one shared scope: B now reuses what A computed there.
    let shared = [("x-tokenfab-cache-scope", "harbour")];
    let _: Value = call(&url, Some(&a), &body, &shared)
        .await
        .json()
        .await
        .expect("json");
    let hit: Value = call(&url, Some(&b), &body, &shared)
        .await
        .json()
        .await
        .expect("json");
    assert!(cached(&hit) > Some(256), "shared scope: {hit}");
    // Usage: each key sees its own tenant only.
    let (s, v) = get(&url, "/v1/usage?group_by=tenant", Some(&a)).await;
    assert_eq!(s, 200);
    let groups: Vec<&str> = v["data"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["group"].as_str())
        .collect();
    assert_eq!(groups, vec!["tenant-a"]);
    assert_eq!(v["data"][0]["requests"], 3);
    assert_eq!(
        get(&url, "/v1/usage?tenant=tenant-b", Some(&a)).await.0,
        403
    );
    let (_, v) = get(&url, "/v1/usage?group_by=tenant", Some(&b)).await;
    assert_eq!(v["data"][0]["group"], "tenant-b");
}

/// Mixed load with client disconnects: the ledger bills exactly the completion tokens the
/// engine handed to requests, and no reservation stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_totals_equal_what_the_engine_handed_out() {
    let url = serve(keyed(config())).await;
    let (_, key) = create_key(&url, json!({"tenant": "parity"})).await;
    let mut tasks = Vec::new();
    for n in 0..12u64 {
        let (url, key) = (url.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let stream = n % 2 == 0;
            let body = chat_body(
                &format!("Tell me a long story about ship number {n}."),
                json!({"max_tokens": 40, "stream": stream, "seed": n}),
            );
            let r = call(&url, Some(&key), &body, &[]).await;
            assert_eq!(r.status(), 200);
            if n % 3 == 0 {
                // Disconnect mid-way: read a little, then drop the connection.
                let mut s = r.bytes_stream();
                let _ = futures::StreamExt::next(&mut s).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(s);
            } else {
                let _ = r.bytes().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_parity(&url, 12).await;
}

/// Once every one of `requests` reservations has ended (cancelled requests settle on
/// background tasks, so wait for them), the ledger's completion tokens equal what the
/// engine handed out.
async fn assert_parity(url: &str, requests: u64) {
    let mut totals = Value::Null;
    for _ in 0..100 {
        let (_, v) = get(url, "/admin/v1/usage?group_by=tenant", Some(ADMIN)).await;
        if v["data"][0]["requests"] == requests {
            totals = v["data"][0].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        totals["requests"], requests,
        "every reservation ended: {totals}"
    );
    let delivered = common::metric(url, "tokenfab_engine_delivered_tokens_total").await as u64;
    assert!(delivered > 0);
    assert_eq!(
        totals["completion_tokens"].as_u64(),
        Some(delivered),
        "ledger completion tokens equal the engine's delivered tokens"
    );
}

/// Parity through upstream failures on a durable ledger: an engine whose every 9th step
/// fails (fault injection in the timing model), streams and whole responses, a third of
/// the clients disconnecting. Afterwards the ledger bills exactly the tokens the engine
/// handed out, every reservation has ended exactly once (one row per request, none open),
/// and the failures were reported to the clients as errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_totals_equal_the_engine_through_failures_and_disconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("ledger.db");
    let mut cfg = keyed(config());
    cfg.model.mock = "linear:3:0,fail-every=9".into();
    cfg.gateway.ledger = ledger.display().to_string();
    let url = common::serve_mock(cfg).await;
    let (_, key) = create_key(&url, json!({"tenant": "faults"})).await;
    let requests = 30u64;
    let mut tasks = Vec::new();
    for n in 0..requests {
        let (url, key) = (url.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let stream = n % 2 == 0;
            let body = json!({"model": "mock", "max_tokens": 8 + n % 12, "stream": stream,
                "messages": [{"role": "user", "content": format!("request {n}")}]});
            let r = call(&url, Some(&key), &body, &[]).await;
            let status = r.status().as_u16();
            if n % 3 == 0 {
                let mut s = r.bytes_stream();
                let _ = futures::StreamExt::next(&mut s).await;
                drop(s);
                return (status, false);
            }
            let text = String::from_utf8_lossy(&r.bytes().await.expect("body")).into_owned();
            (status, text.contains("\"error\""))
        }));
    }
    let mut failed = 0;
    for t in tasks {
        let (status, error) = t.await.expect("task");
        assert!(status == 200 || status == 500, "status {status}");
        if status == 500 || error {
            failed += 1;
        }
    }
    assert!(failed > 0, "the injected failures reached some clients");
    assert_parity(&url, requests).await;
    // The rows themselves: one per request, none open, none twice.
    let store = tokenfab_ledger::SqlStore::open(&ledger.display().to_string())
        .await
        .expect("open the ledger file");
    use tokenfab_ledger::LedgerStore;
    assert_eq!(store.open_reservations().await.expect("count"), 0);
    let rows = store
        .usage(&tokenfab_ledger::UsageQuery {
            tenant: None,
            key_id: None,
            since: None,
            group_by: tokenfab_ledger::GroupBy::Key,
        })
        .await
        .expect("usage");
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_replays_without_running_or_billing_again() {
    let url = serve(keyed(config())).await;
    let (_, key) = create_key(&url, json!({"tenant": "idem"})).await;
    let body = short(json!({"seed": 5, "temperature": 0.9}));
    let idem = [("idempotency-key", "order-42")];
    let first = call(&url, Some(&key), &body, &idem).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.expect("json");
    let again = call(&url, Some(&key), &body, &idem).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("json");
    assert_eq!(first, again, "the stored response, same id");
    let (_, usage) = get(&url, "/v1/usage?group_by=tenant", Some(&key)).await;
    assert_eq!(usage["data"][0]["requests"], 1, "billed once: {usage}");
    let other = short(json!({"seed": 6}));
    let r = call(&url, Some(&key), &other, &idem).await;
    assert_eq!(r.status().as_u16(), 422);
    assert_eq!(
        code(&r.json().await.expect("json")),
        "idempotency_key_mismatch"
    );
    // A stream is stored as sent and replayed as one SSE body, billed once.
    let streamed = short(json!({"stream": true, "seed": 7, "temperature": 0.9}));
    let s1 = [("idempotency-key", "s-1")];
    let r = call(&url, Some(&key), &streamed, &s1).await;
    assert_eq!(r.status(), 200);
    let sent = r.text().await.expect("stream");
    assert!(sent.ends_with("data: [DONE]\n\n"), "{sent}");
    let r = call(&url, Some(&key), &streamed, &s1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(
        r.text().await.expect("replay"),
        sent,
        "the same events, same id"
    );
    let (_, usage) = get(&url, "/v1/usage?group_by=tenant", Some(&key)).await;
    assert_eq!(
        usage["data"][0]["requests"], 2,
        "the stream billed once: {usage}"
    );
    // A stream cut short stores nothing: its claim is released and a retry runs again.
    let long = short(json!({"stream": true, "max_tokens": 200, "seed": 8}));
    let s2 = [("idempotency-key", "s-2")];
    let r = call(&url, Some(&key), &long, &s2).await;
    let mut events = r.bytes_stream();
    let _ = futures::StreamExt::next(&mut events).await;
    drop(events);
    let mut retried = None;
    for _ in 0..50 {
        let r = call(&url, Some(&key), &long, &s2).await;
        if r.status().as_u16() != 409 {
            retried = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = retried.expect("the claim was released");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("idempotent-replayed").is_none(),
        "ran again"
    );
    let long = "k".repeat(300);
    let r = call(
        &url,
        Some(&key),
        &body,
        &[("idempotency-key", long.as_str())],
    )
    .await;
    assert_eq!(r.status().as_u16(), 400);
    // Another tenant's equal key is its own.
    let (_, other_key) = create_key(&url, json!({"tenant": "idem-2"})).await;
    let r = call(&url, Some(&other_key), &other, &idem).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("idempotent-replayed").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_cache_serves_deterministic_repeats_per_tenant_without_billing() {
    let url = serve(keyed(config())).await;
    let (_, a) = create_key(&url, json!({"tenant": "cache-a"})).await;
    let (_, b) = create_key(&url, json!({"tenant": "cache-b"})).await;
    let on = [("x-tokenfab-cache", "on")];
    let body = short(json!({"temperature": 0}));
    let state = |r: &reqwest::Response| {
        r.headers()
            .get("x-tokenfab-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let first = call(&url, Some(&a), &body, &on).await;
    assert_eq!(state(&first).as_deref(), Some("miss"));
    let first: Value = first.json().await.expect("json");
    let again = call(&url, Some(&a), &body, &on).await;
    assert_eq!(state(&again).as_deref(), Some("hit"));
    assert_eq!(again.json::<Value>().await.expect("json"), first);
    let (_, usage) = get(&url, "/v1/usage?group_by=tenant", Some(&a)).await;
    assert_eq!(
        usage["data"][0]["requests"], 1,
        "a hit is not billed: {usage}"
    );
    let other = call(&url, Some(&b), &body, &on).await;
    assert_eq!(
        state(&other).as_deref(),
        Some("miss"),
        "never another tenant's entry"
    );
    let random = call(&url, Some(&a), &short(json!({"temperature": 0.9})), &on).await;
    assert_eq!(state(&random).as_deref(), Some("bypass"));
    let seeded = short(json!({"temperature": 0.9, "seed": 3}));
    assert_eq!(
        state(&call(&url, Some(&a), &seeded, &on).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        state(&call(&url, Some(&a), &seeded, &on).await).as_deref(),
        Some("hit")
    );
    let streamed = call(
        &url,
        Some(&a),
        &short(json!({"temperature": 0, "stream": true})),
        &on,
    )
    .await;
    assert_eq!(state(&streamed).as_deref(), Some("bypass"));
    let bad = call(&url, Some(&a), &body, &[("x-tokenfab-cache", "yes")]).await;
    assert_eq!(bad.status().as_u16(), 400);
    assert!(
        state(&call(&url, Some(&a), &body, &[]).await).is_none(),
        "off unless asked"
    );
    // A key created with the cache on uses it without the header; `off` opts out.
    let (_, c) = create_key(&url, json!({"tenant": "cache-c", "response_cache": true})).await;
    assert_eq!(
        state(&call(&url, Some(&c), &body, &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        state(&call(&url, Some(&c), &body, &[]).await).as_deref(),
        Some("hit")
    );
    let off = [("x-tokenfab-cache", "off")];
    assert!(state(&call(&url, Some(&c), &body, &off).await).is_none());
    let (_, keys) = get(&url, "/admin/v1/keys?tenant=cache-c", Some(ADMIN)).await;
    assert_eq!(keys["data"][0]["response_cache"], true);
}

/// A TTFT target the engine predicts it cannot meet (from its measured prefill rate and
/// queue) is refused at once with 503 and Retry-After; a reachable one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_ttft_target_is_refused_up_front() {
    let mut cfg = config();
    cfg.model.mock = "linear:5:1000".into(); // 1 ms per prompt token
    cfg.model.kv_tokens = 16384;
    let url = common::serve_mock(cfg).await;
    let body = |words: usize| {
        json!({"model": "mock", "max_tokens": 2,
               "messages": [{"role": "user", "content": "word ".repeat(words)}]})
    };
    // Teach the engine its prefill rate (steps with at least 64 prefill tokens).
    let r = call(&url, None, &body(200), &[]).await;
    assert_eq!(r.status(), 200);
    let slow = [("x-tokenfab-slo-ttft-ms", "50")];
    let r = call(&url, None, &body(400), &slow).await; // ~2,000 tokens: ~2 s of prefill
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("time-to-first-token")),
        "{v}"
    );
    let relaxed = [
        ("x-tokenfab-slo-ttft-ms", "60000"),
        ("x-tokenfab-slo-tpot-ms", "1000"),
    ];
    let r = call(&url, None, &body(400), &relaxed).await;
    assert_eq!(r.status(), 200);
}

/// A tenant's KV cap over HTTP: a prompt that cannot fit is a 400 naming the quota, and a
/// request that fits has its output clamped to the cap (finish reason `length`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_kv_cap_refuses_long_prompts_and_clamps_output() {
    let mut cfg = config();
    cfg.model.mock = "instant".into();
    cfg.model.kv_tokens = 4096;
    // 5 % of 4096 KV tokens, in whole blocks (mock: one token per byte): 204 tokens with
    // serve's 4-token blocks.
    let bt = u64::from(cfg.scheduler.block_tokens);
    let cap = (u64::from(cfg.model.kv_tokens) / bt) * 50 / 1000 * bt;
    cfg.scheduler.tenants.insert(
        "local".into(),
        TenantKvConfig {
            kv_max_share: Some(0.05),
            kv_min_share: 0.0,
        },
    );
    let url = common::serve_mock(cfg).await;
    let ask = |content: String| json!({"model": "mock", "messages": [{"role": "user", "content": content}], "max_tokens": 500});
    let r = call(&url, None, &ask("x".repeat(300)), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("share") && msg.contains(&cap.to_string()),
        "{msg}"
    );
    let r = call(&url, None, &ask("hi".into()), &[]).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let used = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0)
        + v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert_eq!(used, cap, "{v}");
}
