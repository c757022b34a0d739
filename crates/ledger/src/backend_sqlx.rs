//! The writer's statements on sqlx (PostgreSQL).

use crate::model::{utc_day, AttemptId, Reservation, Settled, Settlement, TokenUsage};
use crate::price::Price;
use crate::sql::{i, u};
use crate::sql_text as q;
use crate::store::{LedgerError, Result};
use crate::writer::{Backend, Balance, DbResult, Held};
use sqlx::{AnyConnection, Executor, Row};
use tokenfab_types::NanoUsd;

pub(crate) struct SqlxBackend {
    pub conn: AnyConnection,
}

fn db(e: sqlx::Error) -> String {
    e.to_string()
}

impl Backend for SqlxBackend {
    async fn begin(&mut self) -> DbResult<()> {
        self.conn.execute("BEGIN").await.map_err(db)?;
        Ok(())
    }

    async fn commit(&mut self) -> DbResult<()> {
        self.conn.execute("COMMIT").await.map_err(db)?;
        Ok(())
    }

    async fn rollback(&mut self) {
        let _ = self.conn.execute("ROLLBACK").await;
    }

    async fn reserve(&mut self, r: &Reservation) -> DbResult<Result<()>> {
        let needed = r.amount();
        let held = sqlx::query(q::HOLD)
            .bind(i(needed.0))
            .bind(&r.key_id)
            .execute(&mut self.conn)
            .await
            .map_err(db)?;
        if held.rows_affected() != 1 {
            let row = sqlx::query(q::KEY_STATE)
                .bind(&r.key_id)
                .fetch_optional(&mut self.conn)
                .await
                .map_err(db)?;
            let key = match row {
                None => None,
                Some(row) => Some((
                    row.try_get(0).map_err(db)?,
                    row.try_get(1).map_err(db)?,
                    row.try_get(2).map_err(db)?,
                    row.try_get(3).map_err(db)?,
                )),
            };
            return Ok(Err(q::hold_failure(r, needed, key)));
        }
        let inserted = sqlx::query(q::INSERT)
            .bind(&r.id.request_id)
            .bind(i64::from(r.id.attempt))
            .bind(&r.node)
            .bind(&r.key_id)
            .bind(&r.tenant.0)
            .bind(&r.model)
            .bind(i(needed.0))
            .bind(i(r.price.prompt.0))
            .bind(i(r.price.cached.0))
            .bind(i(r.price.completion.0))
            .bind(utc_day(r.now))
            .bind(r.now)
            .bind(r.x_request_id.clone())
            .execute(&mut self.conn)
            .await
            .map_err(db)?;
        if inserted.rows_affected() != 1 {
            sqlx::query(q::UNHOLD)
                .bind(i(needed.0))
                .bind(&r.key_id)
                .execute(&mut self.conn)
                .await
                .map_err(db)?;
            return Ok(Err(LedgerError::DuplicateReservation(r.id.clone())));
        }
        Ok(Ok(()))
    }

    async fn progress(&mut self, id: &AttemptId, usage: TokenUsage) -> DbResult<Result<()>> {
        let done = sqlx::query(q::PROGRESS)
            .bind(i(usage.prompt.0))
            .bind(i(usage.cached.0))
            .bind(i(usage.completion.0))
            .bind(&id.request_id)
            .bind(i64::from(id.attempt))
            .execute(&mut self.conn)
            .await
            .map_err(db)?;
        Ok(if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(LedgerError::NotOpen(id.clone()))
        })
    }

    async fn held(&mut self, id: &AttemptId) -> DbResult<Option<Held>> {
        let row = sqlx::query(q::HELD)
            .bind(&id.request_id)
            .bind(i64::from(id.attempt))
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let get = |n: &str| row.try_get::<i64, _>(n).map(u).map_err(db);
        Ok(Some(Held {
            key_id: row.try_get("key_id").map_err(db)?,
            amount: NanoUsd(get("amount")?),
            price: Price {
                prompt: NanoUsd(get("price_prompt")?),
                cached: NanoUsd(get("price_cached")?),
                completion: NanoUsd(get("price_completion")?),
            },
        }))
    }

    async fn settle(
        &mut self,
        id: &AttemptId,
        h: &Held,
        s: Settlement,
    ) -> DbResult<Result<Settled>> {
        let usage = s.usage;
        let cost = h.price.cost(usage.prompt, usage.cached, usage.completion);
        let done = sqlx::query(q::SETTLE)
            .bind(q::settled_state(&usage))
            .bind(s.outcome.as_str())
            .bind(i(usage.prompt.0))
            .bind(i(usage.cached.0))
            .bind(i(usage.completion.0))
            .bind(i(cost.0))
            .bind(s.now)
            .bind(&id.request_id)
            .bind(i64::from(id.attempt))
            .execute(&mut self.conn)
            .await
            .map_err(db)?;
        if done.rows_affected() != 1 {
            return Ok(Err(LedgerError::NotOpen(id.clone())));
        }
        sqlx::query(q::CHARGE)
            .bind(i(h.amount.0))
            .bind(i(cost.0))
            .bind(&h.key_id)
            .execute(&mut self.conn)
            .await
            .map_err(db)?;
        Ok(Ok(Settled {
            cost,
            held: h.amount,
        }))
    }

    async fn balance(&mut self, key_id: &str) -> DbResult<Option<Balance>> {
        let row = sqlx::query(q::BALANCE)
            .bind(key_id)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let n = |k: usize| row.try_get::<i64, _>(k).map(|v| NanoUsd(u(v))).map_err(db);
        Ok(Some(Balance {
            budget: row
                .try_get::<Option<i64>, _>(0)
                .map_err(db)?
                .map(|v| NanoUsd(u(v))),
            spent: n(1)?,
            reserved: n(2)?,
        }))
    }
}
