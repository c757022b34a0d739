//! The conformance suite on every store: memory, SQLite, and a real PostgreSQL server.

use std::sync::Arc;
use tokenfab_ledger::testkit::postgres_or_skip;
use tokenfab_ledger::{conformance, LedgerStore, MemoryStore, SqlStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    conformance::run_all(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    let store = SqlStore::open(&path.display().to_string())
        .await
        .expect("open sqlite");
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db").display().to_string();
    let store = SqlStore::open(&path).await.expect("open");
    conformance::crash_recovery(&store).await;
    drop(store);
    let again = SqlStore::open(&path).await.expect("reopen");
    assert_eq!(again.open_reservations().await.expect("count"), 0);
    assert_eq!(again.list_keys(None).await.expect("keys").len(), 1);
}

/// A ledger written by an earlier release (no `api_keys.response_cache`, no
/// `reservations.x_request_id`) opens, gains the columns, and keeps its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_ledger_from_an_earlier_release_is_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    let old = rusqlite::Connection::open(&path).expect("create");
    old.execute_batch(
        "CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, tenant TEXT NOT NULL, hash BLOB NOT NULL,
            rpm BIGINT, tpm BIGINT, max_concurrency BIGINT, budget BIGINT,
            spent BIGINT NOT NULL DEFAULT 0, reserved BIGINT NOT NULL DEFAULT 0,
            priority TEXT NOT NULL, weight BIGINT NOT NULL,
            created_at BIGINT NOT NULL, revoked_at BIGINT);
         CREATE TABLE reservations (
            request_id TEXT NOT NULL, attempt BIGINT NOT NULL, node TEXT NOT NULL,
            key_id TEXT NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
            amount BIGINT NOT NULL,
            price_prompt BIGINT NOT NULL, price_cached BIGINT NOT NULL,
            price_completion BIGINT NOT NULL,
            prompt_tokens BIGINT NOT NULL DEFAULT 0, cached_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0, cost BIGINT NOT NULL DEFAULT 0,
            state TEXT NOT NULL, outcome TEXT, day TEXT NOT NULL,
            created_at BIGINT NOT NULL, settled_at BIGINT,
            PRIMARY KEY (request_id, attempt));
         INSERT INTO api_keys (id, tenant, hash, priority, weight, created_at)
            VALUES ('kold', 'acme', zeroblob(32), 'standard', 1, 0);",
    )
    .expect("old schema");
    drop(old);
    let store = SqlStore::open(&path.display().to_string())
        .await
        .expect("open and migrate");
    let keys = store.list_keys(None).await.expect("keys");
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].response_cache);
    conformance::run_all(Arc::new(store)).await;
    // Rows carry the request's x-request-id (a column added after the first release).
    let db = rusqlite::Connection::open(&path).expect("reopen");
    let tagged: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM reservations WHERE x_request_id = 'x-' || request_id",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert!(tagged > 0, "x_request_id stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_conforms() {
    let Some(pg) = postgres_or_skip("postgres_store_conforms") else {
        return;
    };
    let url = pg.database().expect("createdb");
    let store = SqlStore::open(&url).await.expect("open postgres");
    conformance::run_all(Arc::new(store)).await;
}

/// Four independent stores (four connection pools and group-commit writers, as four
/// gateway processes would have) racing on one PostgreSQL database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_budget_race_across_four_writers() {
    let Some(pg) = postgres_or_skip("postgres_budget_race_across_four_writers") else {
        return;
    };
    let url = pg.database().expect("createdb");
    let mut stores: Vec<Arc<dyn LedgerStore>> = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(SqlStore::open(&url).await.expect("open")));
    }
    conformance::budget_race(&stores, 1000, 20).await;
}

/// The serving mode of SQLite: budgets held in memory, written behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_serving_store_conforms_and_is_exclusive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db").display().to_string();
    let store = SqlStore::open_serving(&path).await.expect("open serving");
    let second = SqlStore::open_serving(&path).await;
    assert!(
        second.is_err_and(|e| e.to_string().contains("PostgreSQL")),
        "a second serving process on one SQLite file is refused"
    );
    let tool = SqlStore::open(&path)
        .await
        .expect("tools may still open it");
    drop(tool);
    conformance::run_all(Arc::new(store)).await;
}
