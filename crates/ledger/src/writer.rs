//! The group-commit writer of [`SqlStore`](crate::SqlStore): one task per process owns one
//! connection and applies every waiting reserve, progress and settle (up to
//! [`MAX_GROUP`]) in one transaction with one commit, so a busy server pays one fsync per
//! group rather than per request.
//!
//! When each call returns:
//! - `progress` and `settle` once the commit that holds them is durable. On SQLite the
//!   commit itself does not fsync (WAL, `synchronous=NORMAL`, which keeps the file
//!   consistent); a second thread, the syncer, fsyncs the WAL after it and only then
//!   answers. While that fsync waits, the writer keeps its next transaction open and
//!   applies whatever arrives; it commits when the syncer is free, so a busy server makes
//!   about one commit per fsync, each covering many requests. PostgreSQL commits are
//!   durable when they return.
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

/// An fsync slower than this is logged: every response waiting on it was held that long.
const SLOW_FSYNC: std::time::Duration = std::time::Duration::from_millis(50);

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
        if let Some(reply) = self.reply.take() {
            deliver(reply, done);
        }
    }

    fn fail(&mut self, e: &str) {
        if let Some(reply) = self.reply.take() {
            let settled = reply_kind(&reply);
            deliver(reply, failure(settled, e));
        }
    }
}

fn reply_kind(r: &Reply) -> bool {
    matches!(r, Reply::Settled(_))
}

/// The failure a reply of this kind (`true` = settlement) carries.
fn failure(settled: bool, e: &str) -> Done {
    let err = LedgerError::Storage(e.to_owned());
    if settled {
        Done::Settled(Err(err))
    } else {
        Done::Unit(Err(err))
    }
}

fn deliver(reply: Reply, done: Done) {
    let mismatched = || LedgerError::Storage("mismatched reply".into());
    match (reply, done) {
        (Reply::Unit(tx), Done::Unit(r)) => {
            let _ = tx.send(r);
        }
        (Reply::Settled(tx), Done::Settled(r)) => {
            let _ = tx.send(r);
        }
        (Reply::Unit(tx), Done::Settled(_)) => {
            let _ = tx.send(Err(mismatched()));
        }
        (Reply::Settled(tx), Done::Unit(_)) => {
            let _ = tx.send(Err(mismatched()));
        }
    }
}

/// Answers that wait for their commit to be durable.
type Answers = Vec<(Reply, Done)>;

/// Where committed answers go: answered at once when `commit` was durable by itself
/// (PostgreSQL, or SQLite with FULL sync), or handed to the syncer thread when the
/// backend leaves the fsync to the writer (see [`Backend::deferred_sync`]).
enum Durability {
    AtCommit,
    Syncer {
        tx: std::sync::mpsc::Sender<Answers>,
        /// Commits handed to the syncer and not yet answered.
        pending: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        /// Signalled each time the syncer answered what it had.
        idle: std::sync::Arc<tokio::sync::Notify>,
    },
}

impl Durability {
    fn release(&self, answers: Answers) {
        match self {
            Durability::AtCommit => answers.into_iter().for_each(|(r, d)| deliver(r, d)),
            // Nothing waits on this commit (only written-behind reserves): its bytes are
            // covered by the next fsync, which any later answer waits for.
            Durability::Syncer { .. } if answers.is_empty() => {}
            Durability::Syncer { tx, pending, .. } => {
                pending.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                if let Err(std::sync::mpsc::SendError(answers)) = tx.send(answers) {
                    pending.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    for (r, _) in answers {
                        let kind = reply_kind(&r);
                        deliver(r, failure(kind, "the ledger syncer stopped"));
                    }
                }
            }
        }
    }
}

/// The syncer: fsyncs `file` once for everything committed since its last fsync, then
/// answers those commits — so the next group's statements run while this fsync waits, and
/// one fsync covers every commit that finished while the previous one ran.
fn spawn_syncer(file: std::path::PathBuf) -> std::io::Result<Durability> {
    let (tx, rx) = std::sync::mpsc::channel::<Answers>();
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let idle = std::sync::Arc::new(tokio::sync::Notify::new());
    let (syncer_pending, syncer_idle) = (pending.clone(), idle.clone());
    std::thread::Builder::new()
        .name("ledger-sync".into())
        .spawn(move || {
            // Set when an fsync failed: what it covered may be lost (the kernel may have
            // dropped the dirty pages and will not report it again to a later fsync), and
            // every later commit sits behind it in the WAL, so they all fail until the
            // process restarts and recovery reads what the file really holds.
            let mut failed = false;
            while let Ok(mut answers) = rx.recv() {
                let mut commits = 1;
                while let Ok(more) = rx.try_recv() {
                    answers.extend(more);
                    commits += 1;
                }
                // Opened each time: SQLite may replace the file between syncs.
                let started = std::time::Instant::now();
                let mut synced = std::fs::File::open(&file)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| format!("ledger fsync failed: {e}"));
                if started.elapsed() > SLOW_FSYNC {
                    tracing::warn!(ms = started.elapsed().as_millis() as u64, waiting = answers.len(), "slow ledger fsync: the disk held these requests' responses");
                }
                if let Err(e) = &synced {
                    tracing::error!(error = %e, file = %file.display(), "the requests it covered, and every later one, end in errors until a restart");
                    failed = true;
                } else if failed {
                    synced = Err("an earlier ledger fsync failed; restart to recover".into());
                }
                for (reply, done) in answers {
                    match &synced {
                        Ok(()) => deliver(reply, done),
                        Err(e) => {
                            let kind = reply_kind(&reply);
                            deliver(reply, failure(kind, e));
                        }
                    }
                }
                syncer_pending.fetch_sub(commits, std::sync::atomic::Ordering::AcqRel);
                syncer_idle.notify_one();
            }
        })?;
    Ok(Durability::Syncer { tx, pending, idle })
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
    /// A key's committed budget state (for the mirror).
    async fn balance(&mut self, key_id: &str) -> DbResult<Option<Balance>>;
    /// The file whose fsync makes a `commit` durable, when `commit` leaves that to the
    /// writer; `None` when a commit returns durable.
    fn deferred_sync(&self) -> Option<std::path::PathBuf> {
        None
    }
}

/// A key's budget state as the writer knows it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Balance {
    pub budget: Option<NanoUsd>,
    pub spent: NanoUsd,
    pub reserved: NanoUsd,
}

/// Budgets held in memory by the one process allowed to reserve against a SQLite
/// ledger (it holds the ledger's lock file): a reserve is checked and held here at once
/// and written behind, in order, by the writer — one writer round trip per request
/// instead of two. A key enters the mirror after its first reservation went through the
/// database; from then on the mirror is authoritative for it (the writer keeps it in step
/// with settlements and with any hold the database refused).
pub(crate) type Mirror = std::sync::Arc<std::sync::Mutex<MirrorState>>;

#[derive(Default)]
pub(crate) struct MirrorState {
    balances: HashMap<String, Balance>,
    /// Reservations held through the mirror and not yet settled.
    open: std::collections::HashSet<AttemptId>,
}

/// The handle the store calls.
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
    mirror: Option<Mirror>,
}

impl Writer {
    /// Start the writer on its own thread; `open` makes its backend there.
    pub(crate) fn spawn<B, F>(open: F, mirror: Option<Mirror>) -> Result<Writer>
    where
        B: Backend,
        F: FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = DbResult<B>>>>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let task_mirror = mirror.clone();
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
                            let durability = match backend.deferred_sync() {
                                None => Durability::AtCommit,
                                Some(file) => match spawn_syncer(file) {
                                    Ok(syncer) => syncer,
                                    Err(e) => {
                                        let _ = ready_tx.send(Err(e.to_string()));
                                        return;
                                    }
                                },
                            };
                            let _ = ready_tx.send(Ok(()));
                            let task = Task {
                                db: backend,
                                held: HashMap::new(),
                                mirror: task_mirror,
                                durability,
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
            Ok(Ok(())) => Ok(Writer { tx, mirror }),
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
        if let Some(held) = self.hold_in_mirror(r)? {
            held?;
            // Written behind, in order; the request's next progress or settlement waits
            // for a commit after it.
            return self
                .tx
                .send(Job {
                    op: Op::Reserve(r.clone()),
                    reply: None,
                })
                .await
                .map_err(|_| LedgerError::Storage("ledger writer stopped".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Reserve(r.clone()), Reply::Unit(tx), rx)
            .await
    }

    /// `Some(outcome)` when the key's budget is in the mirror (held there if it fits).
    fn hold_in_mirror(&self, r: &Reservation) -> Result<Option<Result<()>>> {
        let Some(mirror) = &self.mirror else {
            return Ok(None);
        };
        let mut m = mirror
            .lock()
            .map_err(|_| LedgerError::Storage("ledger mirror lock poisoned".into()))?;
        Ok(hold(&mut m, r))
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

/// Hold `r` in the mirror: `None` when the mirror does not know its key yet. Once a key is
/// known, every reserve of it — also one that reached the writer before the key was
/// known — passes here first, so the mirror's order is the order of the holds.
fn hold(m: &mut MirrorState, r: &Reservation) -> Option<Result<()>> {
    if m.open.contains(&r.id) {
        return Some(Err(LedgerError::DuplicateReservation(r.id.clone())));
    }
    let b = m.balances.get_mut(&r.key_id)?;
    let needed = r.amount();
    if let Some(budget) = b.budget {
        let remaining = budget - b.spent - b.reserved;
        if needed > remaining {
            return Some(Err(LedgerError::InsufficientBudget { needed, remaining }));
        }
    }
    b.reserved += needed;
    m.open.insert(r.id.clone());
    Some(Ok(()))
}

/// What a transaction's statements left for its commit.
#[derive(Default)]
struct Group {
    /// (job index, its answer, the key charged when it settled).
    after_commit: Vec<(usize, Done, Option<String>)>,
    /// Reservations made, remembered once committed.
    made: Vec<Reservation>,
}

struct Task<B> {
    db: B,
    held: HashMap<AttemptId, Held>,
    mirror: Option<Mirror>,
    durability: Durability,
}

impl<B> Task<B> {
    fn with_mirror(&self, f: impl FnOnce(&mut MirrorState)) {
        if let Some(m) = &self.mirror {
            if let Ok(mut m) = m.lock() {
                f(&mut m);
            }
        }
    }
}

impl<B: Backend> Task<B> {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(MAX_GROUP);
        while rx.recv_many(&mut jobs, MAX_GROUP).await > 0 {
            match self.apply(&mut jobs, Some(&mut rx)).await {
                Ok(answers) => self.durability.release(answers),
                Err(e) => {
                    tracing::warn!(error = %e, jobs = jobs.len(), "ledger group commit failed; retrying one by one");
                    for job in std::mem::take(&mut jobs) {
                        let mut one = vec![job];
                        match self.apply(&mut one, None).await {
                            Ok(answers) => self.durability.release(answers),
                            Err(e) => one.iter_mut().for_each(|j| j.fail(&e)),
                        }
                    }
                }
            }
            jobs.clear();
        }
    }

    /// One transaction over `jobs`, and over the jobs that arrive on `rx` while the syncer
    /// is still busy with an earlier commit (see [`Task::more_while_syncing`]).
    async fn apply(
        &mut self,
        jobs: &mut Vec<Job>,
        mut rx: Option<&mut mpsc::Receiver<Job>>,
    ) -> DbResult<Answers> {
        self.db.begin().await?;
        let mut group = Group::default();
        let mut applied = 0;
        let r = loop {
            if let Err(e) = self.apply_in(jobs, applied, &mut group).await {
                break Err(e);
            }
            applied = jobs.len();
            let more = match rx.as_deref_mut() {
                Some(rx) => self.more_while_syncing(rx, jobs).await,
                None => false,
            };
            if !more {
                break self.commit(jobs, group).await;
            }
        };
        if r.is_err() {
            self.db.rollback().await;
        }
        r
    }

    /// While the syncer still fsyncs an earlier commit, the answers of a commit made now
    /// would wait for that fsync and then for their own anyway: keep the transaction open
    /// and take the jobs that arrive until the syncer is free (or the group is full), so
    /// one commit, and the one fsync after it, covers more requests. Their statements run
    /// while the fsync waits, as before; answers come no later; commits, WAL writes and
    /// wake-ups per request drop. Reserves are still answered as their statement runs.
    /// `true` when jobs were added.
    async fn more_while_syncing(&self, rx: &mut mpsc::Receiver<Job>, jobs: &mut Vec<Job>) -> bool {
        let Durability::Syncer { pending, idle, .. } = &self.durability else {
            return false;
        };
        while jobs.len() < MAX_GROUP && pending.load(std::sync::atomic::Ordering::Acquire) > 0 {
            let room = MAX_GROUP - jobs.len();
            tokio::select! {
                biased;
                () = idle.notified() => {}
                n = rx.recv_many(jobs, room) => return n > 0,
            }
        }
        false
    }

    /// The statements of `jobs[from..]`, in the open transaction. Reserves are answered
    /// here; the answers that must wait for the commit to be durable go to `group`.
    async fn apply_in(&mut self, jobs: &mut [Job], from: usize, group: &mut Group) -> DbResult<()> {
        let Group { after_commit, made } = group;
        for (n, job) in jobs.iter_mut().enumerate().skip(from) {
            match &job.op {
                Op::Reserve(r) => {
                    // A reserve that reached the writer directly (`reply` present) is held
                    // in the mirror first when the mirror knows its key.
                    let mut mirrored = job.reply.is_none();
                    let mut res = Ok(());
                    if !mirrored {
                        let held = self
                            .mirror
                            .as_ref()
                            .and_then(|m| m.lock().ok().and_then(|mut m| hold(&mut m, r)));
                        if let Some(held) = held {
                            mirrored = true;
                            res = held;
                        }
                    }
                    if res.is_ok() {
                        res = if self.held.contains_key(&r.id) {
                            Err(LedgerError::DuplicateReservation(r.id.clone()))
                        } else {
                            self.db.reserve(r).await?
                        };
                        match (&res, mirrored) {
                            (Ok(()), false) => self.with_mirror(|m| {
                                m.open.insert(r.id.clone());
                            }),
                            (Err(e), true) => {
                                // Held in memory, refused by the database: give it back.
                                tracing::error!(error = %e, request = %r.id.request_id, "a reservation held in memory was refused by the ledger database");
                                self.with_mirror(|m| {
                                    m.open.remove(&r.id);
                                    if let Some(b) = m.balances.get_mut(&r.key_id) {
                                        b.reserved = b.reserved - r.amount();
                                    }
                                });
                            }
                            _ => {}
                        }
                        if res.is_ok() {
                            made.push(r.clone());
                        }
                    }
                    job.answer(Done::Unit(res));
                }
                Op::Progress(id, usage) => {
                    let done = Done::Unit(self.db.progress(id, *usage).await?);
                    after_commit.push((n, done, None));
                }
                Op::Settle(id, s) => {
                    let held = match self.held.get(id) {
                        Some(h) => Some(h.clone()),
                        None => self.db.held(id).await?,
                    };
                    let (done, key) = match held {
                        None => (Err(LedgerError::NotOpen(id.clone())), None),
                        Some(h) => (self.db.settle(id, &h, *s).await?, Some(h.key_id)),
                    };
                    after_commit.push((n, Done::Settled(done), key));
                }
            }
        }
        Ok(())
    }

    /// Commit the transaction `group` was applied in; the answers waiting for it.
    async fn commit(&mut self, jobs: &mut [Job], group: Group) -> DbResult<Answers> {
        let Group { after_commit, made } = group;
        self.db.commit().await?;
        if self.mirror.is_some() {
            for r in &made {
                let known = self
                    .mirror
                    .as_ref()
                    .and_then(|m| m.lock().ok().map(|m| m.balances.contains_key(&r.key_id)))
                    .unwrap_or(true);
                if !known {
                    if let Some(b) = self.db.balance(&r.key_id).await? {
                        self.with_mirror(|m| {
                            m.balances.entry(r.key_id.clone()).or_insert(b);
                        });
                    }
                }
            }
        }
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
        let mut answers = Vec::with_capacity(after_commit.len());
        for (n, done, key) in after_commit {
            let Some(job) = jobs.get_mut(n) else { continue };
            if let (Done::Settled(Ok(settled)), Some(key)) = (&done, key) {
                if let Op::Settle(id, _) = &job.op {
                    self.held.remove(id);
                    self.with_mirror(|m| {
                        m.open.remove(id);
                    });
                }
                self.with_mirror(|m| {
                    if let Some(b) = m.balances.get_mut(&key) {
                        b.reserved = b.reserved - settled.held;
                        b.spent += settled.cost;
                    }
                });
            }
            if let Some(reply) = job.reply.take() {
                answers.push((reply, done));
            }
        }
        Ok(answers)
    }
}
