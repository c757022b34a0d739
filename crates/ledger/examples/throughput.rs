//! Reserve + settle round trips per second against a store, from N concurrent clients:
//! `cargo run --release -p tokenfab-ledger --example throughput -- [URL] [CLIENTS] [SECS]`
//! (URL: a SQLite path (default: a temp file), `postgres://…`, or `memory`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfab_ledger::{
    new_key, AttemptId, KeySpec, Outcome, Price, Reservation, Settlement, TokenUsage,
};
use tokenfab_types::{TenantId, Tokens};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::env::temp_dir().join(format!("tf-ledger-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let default = dir.join("ledger.db").display().to_string();
    let url = args.get(1).cloned().unwrap_or(default);
    let clients: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let store = tokenfab_ledger::open(&url, true).await?;
    let (key, _) = new_key(
        &KeySpec::new(TenantId("bench".into())),
        0,
        &mut rand::thread_rng(),
    );
    store.create_key(&key).await?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (store, key, done) = (store.clone(), key.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = Reservation {
                    id: AttemptId::new(format!("c{c}-{n}"), 0),
                    node: "bench".into(),
                    key_id: key.id.clone(),
                    tenant: key.tenant.clone(),
                    model: "m".into(),
                    prompt: Tokens(10),
                    max_completion: Tokens(10),
                    price: Price::default(),
                    now: 0,
                    x_request_id: None,
                };
                store.reserve(&r).await.expect("reserve");
                let usage = TokenUsage {
                    prompt: Tokens(10),
                    cached: Tokens(0),
                    completion: Tokens(1),
                };
                let s = Settlement {
                    usage,
                    outcome: Outcome::Completed,
                    now: 0,
                };
                store.settle(&r.id, s).await.expect("settle");
                lat.push(t.elapsed());
                n += 1;
            }
            done.fetch_add(n, Ordering::Relaxed);
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    lat.sort();
    let n = done.load(Ordering::Relaxed);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{url}: {clients} clients, {:.0} reserve+settle/s, p50 {:?}, p99 {:?}",
        n as f64 / secs as f64,
        pct(0.5),
        pct(0.99)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
