//! The real binary as separate processes: `kill -9` during streams and recovery at the
//! next start, and four gateway processes sharing one PostgreSQL ledger.

mod common;

use common::{chat_body, client, free_port, spawn, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokenfab_ledger::testkit::postgres_or_skip;

const ADMIN: &str = "proc-admin-key-0123456789";
/// Start `tokenfab serve` with the default model, small KV, and `extra` flags.
async fn start(dir: &Path, port: u16, completion_price: f64, extra: &[&str]) -> Server {
    common::model(); // make sure the model is in the cache before the child looks for it
    let config = dir.join(format!("prices-{port}.toml"));
    std::fs::write(
        &config,
        format!("[prices.smollm2-135m-instruct]\nprompt_usd_per_mtok = 1.0\ncached_usd_per_mtok = 1.0\ncompletion_usd_per_mtok = {completion_price:?}\n"),
    )
    .expect("write config");
    let port_s = port.to_string();
    let config = config.display().to_string();
    // 1,024 cells per sequence: 8 slots of the default per-sequence layout.
    let mut args = vec!["serve", "--port", &port_s, "--kv-tokens", "8192"];
    args.extend(["--slots", "8", "--threads", "1", "--admin-key", ADMIN]);
    args.extend(["--config", &config]);
    args.extend(extra);
    spawn(&args, port, &dir.join(format!("serve-{port}.log"))).await
}

/// `n` gateway processes sharing the ledger at `db`, each with its own node name.
async fn gateways(dir: &Path, n: usize, db: &str, extra: &[&str]) -> Vec<Server> {
    let mut servers = Vec::new();
    for i in 0..n {
        let node = format!("gw-{i}");
        let mut flags = vec!["--ledger", db, "--node", node.as_str()];
        flags.extend_from_slice(extra);
        servers.push(start(dir, free_port(), 0.0, &flags).await);
    }
    servers
}

async fn admin_get(url: &str, path: &str) -> Value {
    client()
        .get(format!("{url}{path}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json")
}

async fn create_key(url: &str, spec: Value) -> String {
    common::create_key(url, ADMIN, spec).await.1
}

/// Count the content chunks a client received before the server died.
async fn stream_until_killed(url: String, key: String, n: u64) -> u64 {
    let body = chat_body(
        &format!("Write a long poem about lighthouse {n}."),
        json!({"max_tokens": 400, "stream": true, "seed": n}),
    );
    let Ok(r) = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    else {
        return 0;
    };
    let mut chunks = 0;
    let mut s = r.bytes_stream();
    while let Some(Ok(b)) = futures::StreamExt::next(&mut s).await {
        // Content chunks with text (not the opening role chunk, whose content is empty).
        let text = String::from_utf8_lossy(&b);
        let all = text.matches("\"content\":\"").count();
        let empty = text.matches("\"content\":\"\"").count();
        chunks += (all - empty) as u64;
    }
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_streams_then_restart_resolves_every_reservation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("ledger.db").display().to_string();
    let port = free_port();
    let flags = ["--ledger", ledger.as_str(), "--node", "crash-node"];
    let mut server = start(dir.path(), port, 2.0, &flags).await;
    let key = create_key(&server.url, json!({"tenant": "crashy"})).await;
    let streams: Vec<_> = (0..4)
        .map(|n| tokio::spawn(stream_until_killed(server.url.clone(), key.clone(), n)))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SIGKILL: no graceful shutdown, no settlement.
    server.child.kill().expect("kill -9");
    server.child.wait().expect("reap");
    let mut received = 0;
    for s in streams {
        received += s.await.expect("stream task");
    }
    assert!(received > 0, "streams were under way when the server died");
    drop(server);
    let server = start(dir.path(), port, 2.0, &flags).await;
    let rows = admin_get(&server.url, "/admin/v1/usage?group_by=tenant").await;
    let row = &rows["data"][0];
    assert_eq!(row["requests"], 4, "every reservation resolved: {rows}");
    let billed = row["completion_tokens"].as_u64().expect("tokens");
    assert!(
        billed >= received,
        "every token a client received was durably billed first ({billed} billed, {received} chunks received)"
    );
    let keys = admin_get(&server.url, "/admin/v1/keys?tenant=crashy").await;
    assert_eq!(
        keys["data"][0]["reserved"], 0,
        "no reservation left holding budget"
    );
    assert_eq!(
        keys["data"][0]["spent"], row["cost_nano_usd"],
        "spend equals billed usage"
    );
    // Resolved once: a second restart changes nothing.
    drop(server);
    let server = start(dir.path(), port, 2.0, &flags).await;
    let again = admin_get(&server.url, "/admin/v1/usage?group_by=tenant").await;
    assert_eq!(again, rows);
}

/// Four `tokenfab serve` processes on one PostgreSQL ledger; a budget covering exactly 20
/// requests; 1,000 concurrent requests spread over the four → exactly 20 succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_gateways_share_one_postgres_budget_exactly() {
    let Some(pg) = postgres_or_skip("four_gateways_share_one_postgres_budget_exactly") else {
        return;
    };
    let db = pg.database().expect("createdb");
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = gateways(dir.path(), 4, &db, &["--max-waiting", "1000"]).await;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let probe = create_key(&urls[0], json!({"tenant": "probe"})).await;
    let body = chat_body("Say hi.", json!({"max_tokens": 1, "temperature": 0}));
    let v: Value = client()
        .post(format!("{}/v1/chat/completions", urls[1]))
        .bearer_auth(&probe)
        .json(&body)
        .send()
        .await
        .expect("probe")
        .json()
        .await
        .expect("json");
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    // Prompt-only price: each request costs exactly its reservation.
    let per = prompt * 1000;
    let budget = (20 * per) as f64 * 1e-9;
    let key = create_key(&urls[2], json!({"tenant": "race", "budget_usd": budget})).await;
    let mut tasks = Vec::new();
    for n in 0..1000 {
        let (url, key, body) = (urls[n % 4].clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = common::call(&url, Some(&key), &body, &[]).await;
            r.status().as_u16()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            200 => ok += 1,
            429 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(
        ok, 20,
        "exactly the budgeted number succeed across four processes"
    );
    let keys = admin_get(&urls[3], "/admin/v1/keys?tenant=race").await;
    let k = &keys["data"][0];
    assert_eq!(k["reserved"], 0);
    assert_eq!(
        k["spent"].as_u64(),
        Some(20 * per),
        "spent exactly the budget"
    );
}

/// Rate limits shared through Redis: two gateway processes (one PostgreSQL ledger, one
/// Redis) and a key allowing 10 requests per minute; 100 concurrent requests spread over
/// both → exactly 10 succeed, the rest get 429 with OpenAI's rate-limit headers. With
/// per-process counters each gateway would have allowed 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_share_one_rate_limit_through_redis() {
    let test = "two_gateways_share_one_rate_limit_through_redis";
    let Some(pg) = postgres_or_skip(test) else {
        return;
    };
    let Some(redis) = tokenfab_gateway::testkit::redis_or_skip(test) else {
        return;
    };
    let db = pg.database().expect("createdb");
    let dir = tempfile::tempdir().expect("tempdir");
    let servers = gateways(dir.path(), 2, &db, &["--rate-limits", &redis.url()]).await;
    let key = create_key(&servers[0].url, json!({"tenant": "rl", "rpm": 10})).await;
    let body = chat_body("Say hi.", json!({"max_tokens": 1, "temperature": 0}));
    let mut tasks = Vec::new();
    for n in 0..100 {
        let (url, key, body) = (servers[n % 2].url.clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = common::call(&url, Some(&key), &body, &[]).await;
            let h = |name: &str| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let headers = (
                h("x-ratelimit-limit-requests"),
                h("x-ratelimit-remaining-requests"),
                h("retry-after"),
            );
            (r.status().as_u16(), headers)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, (limit, remaining, retry)) = t.await.expect("task");
        assert_eq!(limit.as_deref(), Some("10"), "status {status}");
        match status {
            200 => ok += 1,
            429 => {
                assert_eq!(remaining.as_deref(), Some("0"));
                assert!(retry.is_some(), "429 without Retry-After");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(
        ok, 10,
        "one shared limit of 10 per minute across both gateways"
    );
}
