//! The group-commit writer of [`SqlStore`](crate::SqlStore): one task per process owns one
//! connection and applies every waiting reserve, progress and settle (up to
//! [`MAX_GROUP`]) in one transaction with one commit, so a busy server pays one fsync per
//! group rather than per request.
//!
//! When each call returns:
//! - `progress` and `settle` after the commit that holds them: durable.
//! - `reserve` as soon as its conditional `UPDATE` has run, before the commit. That is
//!   safe because nothing a reservation pays for is released before a later `progress`
//!   or `settle` of the same request, which this writer commits in order after it: if the
//!   process dies first, the reservation was never durable and nothing was served. Budget
//!   checks stay exact across processes sharing PostgreSQL, because the key's row stays
//!   locked until the commit. If a group's commit fails, its jobs are retried one
//!   transaction each; a reservation already answered that then fails makes its request
//!   end in an error at settlement (never an overspend, never a lost row).

use crate::model::{AttemptId, Reservation, Settled, Settlement, TokenUsage};
use crate::price::Price;
use crate::store::{LedgerError, Result};
use std::collections::HashMap;
use tokenfab_types::NanoUsd;
use tokio::sync::{mpsc, oneshot};

/// Most writes committed together.
const MAX_GROUP: usize = 512;

enum Op {
    Reserve(Reservation),
    Progress(AttemptId, TokenUsage),
    Settle(AttemptId, Settlement),
}

enum Reply {
    Unit(oneshot::Sender<Result<()>>),
    Settled(oneshot::Sender<Result<Settled>>),
}

enum Done {
    Unit(Result<()>),
    Settled(Result<Settled>),
}

struct Job {
    op: Op,
    /// Taken when answered (reserves are answered before the commit).
    reply: Option<Reply>,
}

impl Job {
    fn answer(&mut self, done: Done) {
        match (self.reply.take(), done) {
            (Some(Reply::Unit(tx)), Done::Unit(r)) => {
                let _ = tx.send(r);
            }
            (Some(Reply::Settled(tx)), Done::Settled(r)) => {
                let _ = tx.send(r);
            }
            (Some(Reply::Unit(tx)), Done::Settled(_)) => {
                let _ = tx.send(Err(LedgerError::Storage("mismatched reply".into())));
            }
            (Some(Reply::Settled(tx)), Done::Unit(_)) => {
                let _ = tx.send(Err(LedgerError::Storage("mismatched reply".into())));
            }
            (None, _) => {}
        }
    }

    fn fail(&mut self, e: &str) {
        let err = LedgerError::Storage(e.to_owned());
        let done = match self.reply {
            Some(Reply::Settled(_)) => Done::Settled(Err(err)),
            _ => Done::Unit(Err(err)),
        };
        self.answer(done);
    }
}

/// What a reservation holds, so settling it needs no read when this writer made it.
#[derive(Clone)]
pub(crate) struct Held {
    pub key_id: String,
    pub amount: NanoUsd,
    pub price: Price,
}

/// A database error inside the writer (the group is retried job by job).
pub(crate) type DbResult<T> = std::result::Result<T, String>;

/// The statements a writer needs, inside a transaction it opens and commits. Implemented
/// on sqlx for PostgreSQL (`backend_sqlx.rs`) and on rusqlite for SQLite
/// (`backend_sqlite.rs`), over the same SQL text (`sql_text.rs`).
#[allow(async_fn_in_trait)]
pub(crate) trait Backend {
    async fn begin(&mut self) -> DbResult<()>;
    async fn commit(&mut self) -> DbResult<()>;
    async fn rollback(&mut self);
    /// Hold `r.amount()` against the key's budget and record the reservation.
    async fn reserve(&mut self, r: &Reservation) -> DbResult<Result<()>>;
    async fn progress(&mut self, id: &AttemptId, usage: TokenUsage) -> DbResult<Result<()>>;
    /// What an open reservation holds; `None` when it is not open.
    async fn held(&mut self, id: &AttemptId) -> DbResult<Option<Held>>;
    async fn settle(
        &mut self,
        id: &AttemptId,
        h: &Held,
        s: Settlement,
    ) -> DbResult<Result<Settled>>;
}

/// The handle the store calls.
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Start the writer on its own thread; `open` makes its backend there.
    pub(crate) fn spawn<B, F>(open: F) -> Result<Writer>
    where
        B: Backend,
        F: FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = DbResult<B>>>>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    match open().await {
                        Ok(backend) => {
                            let _ = ready_tx.send(Ok(()));
                            let task = Task {
                                db: backend,
                                held: HashMap::new(),
                            };
                            task.run(rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| LedgerError::Storage(format!("cannot start the ledger writer: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Writer { tx }),
            Ok(Err(e)) => Err(LedgerError::Storage(format!("ledger writer: {e}"))),
            Err(_) => Err(LedgerError::Storage("ledger writer died at start".into())),
        }
    }

    async fn submit<T>(&self, op: Op, reply: Reply, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        let stopped = || LedgerError::Storage("ledger writer stopped".into());
        self.tx
            .send(Job {
                op,
                reply: Some(reply),
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub(crate) async fn reserve(&self, r: &Reservation) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Reserve(r.clone()), Reply::Unit(tx), rx)
            .await
    }

    pub(crate) async fn progress(&self, id: &AttemptId, usage: TokenUsage) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Progress(id.clone(), usage), Reply::Unit(tx), rx)
            .await
    }

    pub(crate) async fn settle(&self, id: &AttemptId, s: Settlement) -> Result<Settled> {
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Settle(id.clone(), s), Reply::Settled(tx), rx)
            .await
    }
}

struct Task<B> {
    db: B,
    held: HashMap<AttemptId, Held>,
}

impl<B: Backend> Task<B> {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(MAX_GROUP);
        while rx.recv_many(&mut jobs, MAX_GROUP).await > 0 {
            if let Err(e) = self.apply(&mut jobs).await {
                tracing::warn!(error = %e, jobs = jobs.len(), "ledger group commit failed; retrying one by one");
                for job in &mut jobs {
                    if let Err(e) = self.apply(std::slice::from_mut(job)).await {
                        job.fail(&e);
                    }
                }
            }
            jobs.clear();
        }
    }

    async fn apply(&mut self, jobs: &mut [Job]) -> DbResult<()> {
        self.db.begin().await?;
        let r = self.apply_in(jobs).await;
        if r.is_err() {
            self.db.rollback().await;
        }
        r
    }

    /// One transaction over `jobs`; answers every job once its effect is where its
    /// contract says (see the module doc).
    async fn apply_in(&mut self, jobs: &mut [Job]) -> DbResult<()> {
        let mut after_commit = Vec::with_capacity(jobs.len());
        let mut made = Vec::new();
        for (n, job) in jobs.iter_mut().enumerate() {
            match &job.op {
                Op::Reserve(r) => {
                    let res = if self.held.contains_key(&r.id) {
                        Err(LedgerError::DuplicateReservation(r.id.clone()))
                    } else {
                        self.db.reserve(r).await?
                    };
                    if res.is_ok() {
                        made.push(r.clone());
                    }
                    job.answer(Done::Unit(res));
                }
                Op::Progress(id, usage) => {
                    after_commit.push((n, Done::Unit(self.db.progress(id, *usage).await?)));
                }
                Op::Settle(id, s) => {
                    let held = match self.held.get(id) {
                        Some(h) => Some(h.clone()),
                        None => self.db.held(id).await?,
                    };
                    let done = match held {
                        None => Err(LedgerError::NotOpen(id.clone())),
                        Some(h) => self.db.settle(id, &h, *s).await?,
                    };
                    after_commit.push((n, Done::Settled(done)));
                }
            }
        }
        self.db.commit().await?;
        for r in made {
            self.held.insert(
                r.id.clone(),
                Held {
                    key_id: r.key_id.clone(),
                    amount: r.amount(),
                    price: r.price,
                },
            );
        }
        for (n, done) in after_commit {
            if let (Some(job), Done::Settled(Ok(_))) = (jobs.get(n), &done) {
                if let Op::Settle(id, _) = &job.op {
                    self.held.remove(id);
                }
            }
            if let Some(job) = jobs.get_mut(n) {
                job.answer(done);
            }
        }
        Ok(())
    }
}
