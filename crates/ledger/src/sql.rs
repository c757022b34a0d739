//! The SQL store: SQLite (default, embedded; WAL, synchronous=FULL) or PostgreSQL (shared by
//! several gateway processes), one implementation over sqlx's `Any` driver.
//!
//! Writes on the request path (reserve, progress, settle) go through the group-commit
//! writer (`writer.rs`); keys, usage and idempotency claims are plain statements on the
//! pool.

use crate::backend_sqlite::SqliteBackend;
use crate::backend_sqlx::SqlxBackend;
use crate::model::{
    AttemptId, GroupBy, KeyRecord, Recovery, Reservation, Settled, Settlement, TokenUsage,
    UsageQuery, UsageRow,
};
use crate::store::LedgerError;
use crate::store::{Idempotency, IdempotencyClaim, LedgerStore, Result};
use crate::writer::{Mirror, Writer};
use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use std::str::FromStr;
use tokenfab_types::{Band, NanoUsd, TenantId, Tokens};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    writer: Writer,
    /// Held while serving from a SQLite file: one reserving process per file.
    _lock: Option<std::fs::File>,
}

fn take_lock(db_path: &str) -> Result<std::fs::File> {
    let path = format!("{db_path}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LedgerError::Storage(format!("cannot open {path}: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LedgerError::Storage(format!(
            "another tokenfab process is serving from the SQLite ledger {db_path}; \
             gateways that share a ledger must use PostgreSQL (--ledger postgres://…)"
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(LedgerError::Storage(format!("cannot lock {path}: {e}")))
        }
    }
}

pub(crate) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn schema(d: Dialect) -> [String; 5] {
    let blob = match d {
        Dialect::Sqlite => "BLOB",
        Dialect::Postgres => "BYTEA",
    };
    [
        format!(
            "CREATE TABLE IF NOT EXISTS api_keys (
                id TEXT PRIMARY KEY, tenant TEXT NOT NULL, hash {blob} NOT NULL,
                rpm BIGINT, tpm BIGINT, max_concurrency BIGINT, budget BIGINT,
                spent BIGINT NOT NULL DEFAULT 0, reserved BIGINT NOT NULL DEFAULT 0,
                priority TEXT NOT NULL, weight BIGINT NOT NULL,
                created_at BIGINT NOT NULL, revoked_at BIGINT,
                response_cache BIGINT NOT NULL DEFAULT 0)"
        ),
        "CREATE TABLE IF NOT EXISTS reservations (
            request_id TEXT NOT NULL, attempt BIGINT NOT NULL, node TEXT NOT NULL,
            key_id TEXT NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
            amount BIGINT NOT NULL,
            price_prompt BIGINT NOT NULL, price_cached BIGINT NOT NULL,
            price_completion BIGINT NOT NULL,
            prompt_tokens BIGINT NOT NULL DEFAULT 0, cached_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0, cost BIGINT NOT NULL DEFAULT 0,
            state TEXT NOT NULL, outcome TEXT, day TEXT NOT NULL,
            created_at BIGINT NOT NULL, settled_at BIGINT, x_request_id TEXT,
            PRIMARY KEY (request_id, attempt))"
            .to_owned(),
        "CREATE INDEX IF NOT EXISTS reservations_open ON reservations (node) WHERE state = 'open'"
            .to_owned(),
        "CREATE INDEX IF NOT EXISTS reservations_tenant ON reservations (tenant, created_at)"
            .to_owned(),
        format!(
            "CREATE TABLE IF NOT EXISTS idempotency (
                tenant TEXT NOT NULL, idem_key TEXT NOT NULL, body {blob} NOT NULL,
                node TEXT NOT NULL, response {blob}, created_at BIGINT NOT NULL,
                PRIMARY KEY (tenant, idem_key))"
        ),
    ]
}

impl SqlStore {
    /// Open (creating if needed) the store at `url`: `postgres://…`, or a SQLite file path
    /// (`sqlite://` prefix optional). For tools (keys, usage) and tests.
    pub async fn open(url: &str) -> Result<SqlStore> {
        Self::open_with(url, false).await
    }

    /// Open the store for a serving gateway. On SQLite this process becomes the one that
    /// reserves against the file: it takes `<file>.lock` (a second gateway on the same
    /// SQLite ledger is refused — share PostgreSQL instead) and holds budgets in memory.
    pub async fn open_serving(url: &str) -> Result<SqlStore> {
        Self::open_with(url, true).await
    }

    async fn open_with(url: &str, serving: bool) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_owned())
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            (Dialect::Sqlite, format!("sqlite://{path}?mode=rwc"))
        };
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        for p in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA busy_timeout = 10000",
                        ] {
                            conn.execute(p).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(AnyConnectOptions::from_str(&url)?)
            .await?;
        let mut conn = pool.acquire().await?;
        for ddl in schema(dialect) {
            conn.execute(ddl.as_str()).await?;
        }
        migrate(&mut conn, dialect).await?;
        drop(conn);
        let mut lock = None;
        let writer = match dialect {
            Dialect::Sqlite => {
                let path = url
                    .strip_prefix("sqlite://")
                    .unwrap_or(&url)
                    .trim_end_matches("?mode=rwc")
                    .to_owned();
                let mirror = if serving {
                    lock = Some(take_lock(&path)?);
                    Some(Mirror::default())
                } else {
                    None
                };
                Writer::spawn(
                    move || Box::pin(async move { SqliteBackend::open(&path) }),
                    mirror,
                )?
            }
            Dialect::Postgres => {
                let opts = AnyConnectOptions::from_str(&url)?;
                Writer::spawn(
                    move || {
                        Box::pin(async move {
                            let conn = AnyConnection::connect_with(&opts)
                                .await
                                .map_err(|e| e.to_string())?;
                            Ok(SqlxBackend { conn })
                        })
                    },
                    None,
                )?
            }
        };
        Ok(SqlStore {
            pool,
            dialect,
            writer,
            _lock: lock,
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }
}

/// Columns added after a table's first release, for ledgers created before them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("api_keys", "response_cache", "BIGINT NOT NULL DEFAULT 0"),
    ("reservations", "x_request_id", "TEXT"),
];

async fn migrate(conn: &mut sqlx::AnyConnection, dialect: Dialect) -> sqlx::Result<()> {
    for (table, column, ty) in ADDED_COLUMNS {
        let ddl = format!("ALTER TABLE {table} ADD COLUMN {column} {ty}");
        match dialect {
            Dialect::Postgres => {
                let ddl = ddl.replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS");
                conn.execute(ddl.as_str()).await?;
            }
            Dialect::Sqlite => {
                let has: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2",
                )
                .bind(*table)
                .bind(*column)
                .fetch_one(&mut *conn)
                .await?;
                if has == 0 {
                    conn.execute(ddl.as_str()).await?;
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn key_from_row(row: &AnyRow) -> sqlx::Result<KeyRecord> {
    let hash: Vec<u8> = row.try_get("hash")?;
    let priority: String = row.try_get("priority")?;
    let opt = |name: &str| -> sqlx::Result<Option<u64>> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(u))
    };
    Ok(KeyRecord {
        id: row.try_get("id")?,
        tenant: TenantId(row.try_get("tenant")?),
        hash: hash.try_into().unwrap_or([0; 32]),
        rpm: opt("rpm")?,
        tpm: opt("tpm")?,
        max_concurrency: opt("max_concurrency")?,
        budget: opt("budget")?.map(NanoUsd),
        spent: NanoUsd(u(row.try_get("spent")?)),
        reserved: NanoUsd(u(row.try_get("reserved")?)),
        priority: Band::parse(&priority).unwrap_or(Band::Standard),
        weight: u32::try_from(u(row.try_get("weight")?)).unwrap_or(1),
        response_cache: row.try_get::<i64, _>("response_cache")? != 0,
        created_at: row.try_get("created_at")?,
        revoked: row.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
    })
}

fn usage_from_row(row: &AnyRow) -> sqlx::Result<UsageRow> {
    Ok(UsageRow {
        group: row.try_get(0)?,
        requests: u(row.try_get(1)?),
        prompt_tokens: u(row.try_get(2)?),
        cached_tokens: u(row.try_get(3)?),
        completion_tokens: u(row.try_get(4)?),
        cost_nano_usd: u(row.try_get(5)?),
    })
}

#[async_trait]
impl LedgerStore for SqlStore {
    async fn create_key(&self, k: &KeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, hash, rpm, tpm, max_concurrency, budget, spent,
                reserved, priority, weight, created_at, response_cache)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, $8, $9, $10, $11)",
        )
        .bind(&k.id)
        .bind(&k.tenant.0)
        .bind(k.hash.to_vec())
        .bind(k.rpm.map(i))
        .bind(k.tpm.map(i))
        .bind(k.max_concurrency.map(i))
        .bind(k.budget.map(|b| i(b.0)))
        .bind(k.priority.as_str())
        .bind(i64::from(k.weight))
        .bind(k.created_at)
        .bind(i64::from(k.response_cache))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_from_row).transpose()?)
    }

    async fn list_keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyRecord>> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query("SELECT * FROM api_keys WHERE tenant = $1 ORDER BY id")
                    .bind(&t.0)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM api_keys ORDER BY id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.iter().map(key_from_row).collect::<sqlx::Result<_>>()?)
    }

    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn rotate_key(&self, id: &str, hash: [u8; 32]) -> Result<bool> {
        let r = sqlx::query("UPDATE api_keys SET hash = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(hash.to_vec())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn reserve(&self, r: &Reservation) -> Result<()> {
        self.writer.reserve(r).await
    }

    async fn progress(&self, id: &AttemptId, usage: TokenUsage) -> Result<()> {
        self.writer.progress(id, usage).await
    }

    async fn settle(&self, id: &AttemptId, s: Settlement) -> Result<Settled> {
        self.writer.settle(id, s).await
    }

    async fn recover(&self, node: &str, now: i64) -> Result<Recovery> {
        let rows = sqlx::query(
            "SELECT request_id, attempt, prompt_tokens, cached_tokens, completion_tokens
             FROM reservations WHERE node = $1 AND state = 'open'",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        sqlx::query("DELETE FROM idempotency WHERE node = $1 AND response IS NULL")
            .bind(node)
            .execute(&self.pool)
            .await?;
        let mut rec = Recovery::default();
        for row in rows {
            let id = AttemptId::new(
                row.try_get::<String, _>(0)?,
                u32::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0),
            );
            let usage = TokenUsage {
                prompt: Tokens(u(row.try_get(2)?)),
                cached: Tokens(u(row.try_get(3)?)),
                completion: Tokens(u(row.try_get(4)?)),
            };
            self.settle(&id, Settlement::recovered(usage, now)).await?;
            rec.count(&usage);
        }
        Ok(rec)
    }

    async fn open_reservations(&self) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM reservations WHERE state = 'open'")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(u(n))
    }

    async fn idempotency_claim(&self, c: &IdempotencyClaim) -> Result<Idempotency> {
        let claimed = sqlx::query(
            "INSERT INTO idempotency (tenant, idem_key, body, node, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, idem_key) DO NOTHING",
        )
        .bind(&c.tenant.0)
        .bind(&c.key)
        .bind(c.body.to_vec())
        .bind(&c.node)
        .bind(c.now)
        .execute(&self.pool)
        .await?;
        if claimed.rows_affected() == 1 {
            return Ok(Idempotency::Claimed);
        }
        let row = sqlx::query(
            "SELECT body, response FROM idempotency WHERE tenant = $1 AND idem_key = $2",
        )
        .bind(&c.tenant.0)
        .bind(&c.key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            // Released between our insert and read: the caller may retry.
            return Ok(Idempotency::InFlight);
        };
        let body: Vec<u8> = row.try_get("body")?;
        let response: Option<Vec<u8>> = row.try_get("response")?;
        Ok(if body != c.body {
            Idempotency::Mismatch
        } else if let Some(r) = response {
            Idempotency::Done(r)
        } else {
            Idempotency::InFlight
        })
    }

    async fn idempotency_complete(
        &self,
        tenant: &TenantId,
        key: &str,
        response: &[u8],
    ) -> Result<()> {
        sqlx::query("UPDATE idempotency SET response = $1 WHERE tenant = $2 AND idem_key = $3")
            .bind(response.to_vec())
            .bind(&tenant.0)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn idempotency_release(&self, tenant: &TenantId, key: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency WHERE tenant = $1 AND idem_key = $2 AND response IS NULL",
        )
        .bind(&tenant.0)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        let col = match q.group_by {
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::Key => "key_id",
            GroupBy::Tenant => "tenant",
        };
        let mut filters = vec!["state <> 'open'".to_owned()];
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if q.tenant.is_some() {
            filters.push(format!("tenant = {}", next()));
        }
        if q.key_id.is_some() {
            filters.push(format!("key_id = {}", next()));
        }
        if q.since.is_some() {
            filters.push(format!("created_at >= {}", next()));
        }
        let sql = format!(
            "SELECT {col}, COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT),
                CAST(SUM(cached_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT),
                CAST(SUM(cost) AS BIGINT)
             FROM reservations WHERE {} GROUP BY {col} ORDER BY {col}",
            filters.join(" AND ")
        );
        let mut query = sqlx::query(&sql);
        if let Some(t) = &q.tenant {
            query = query.bind(&t.0);
        }
        if let Some(k) = &q.key_id {
            query = query.bind(k);
        }
        if let Some(s) = q.since {
            query = query.bind(s);
        }
        let rows = query.fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(usage_from_row)
            .collect::<sqlx::Result<_>>()?)
    }
}
