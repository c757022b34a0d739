//! The fleet: its members, their health and load, and the choice of a worker per request
//! (through `sched::route`), with retries kept within a budget.

use crate::health::{Change, Health, HealthPolicy};
use crate::metrics::FleetMetrics;
use crate::remote::{Failure, RemoteWorker, WorkerError};
use crate::spec::{AliasSpec, FleetSpec, WorkerSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokenfab_sched::route::{Policy, RouteRequest, Router, WorkerLoad};
use tokenfab_types::Nanos;

/// Where a member runs.
pub enum MemberKind {
    /// This process's engine (the gateway serves it directly).
    Local,
    Remote(Box<RemoteWorker>),
}

/// The router's running account of what it sent a worker.
#[derive(Clone, Copy, Debug, Default)]
struct Load {
    outstanding: u32,
    queued_prefill: u64,
    outstanding_decode: u64,
    kv_permille: u32,
}

pub struct Member {
    pub name: String,
    pub id: u64,
    pub kind: MemberKind,
    pub models: Vec<String>,
    pub tier: u8,
    pub accelerator: String,
    price_nano_usd_per_hour: u64,
    prefill_ns_per_token: u64,
    decode_ns_per_seq: u64,
    health: Mutex<Health>,
    load: Mutex<Load>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Member {
    fn new(kind: MemberKind, spec: &WorkerSpec, policy: HealthPolicy) -> Member {
        let name = spec.display_name();
        Member {
            id: id_of(&name),
            name,
            kind,
            models: spec.models.clone(),
            tier: spec.tier,
            accelerator: if spec.accelerator.is_empty() {
                "unknown".into()
            } else {
                spec.accelerator.clone()
            },
            price_nano_usd_per_hour: (spec.price_usd_per_hour.max(0.0) * 1e9) as u64,
            prefill_ns_per_token: 1_000_000_000 / spec.prefill_tokens_per_s.max(1),
            decode_ns_per_seq: (spec.decode_ms_per_seq.max(0.0) * 1e6) as u64,
            health: Mutex::new(Health::new(policy)),
            load: Mutex::new(Load::default()),
        }
    }

    pub fn remote(&self) -> Option<&RemoteWorker> {
        match &self.kind {
            MemberKind::Remote(r) => Some(r),
            MemberKind::Local => None,
        }
    }

    fn view(&self) -> WorkerLoad {
        let l = *lock(&self.load);
        WorkerLoad {
            id: self.id,
            outstanding_requests: l.outstanding,
            queued_prefill_tokens: l.queued_prefill,
            outstanding_decode_tokens: l.outstanding_decode,
            kv_permille: l.kv_permille,
            prefill_ns_per_token: self.prefill_ns_per_token,
            decode_ns_per_seq: self.decode_ns_per_seq,
            price_nano_usd_per_hour: self.price_nano_usd_per_hour,
        }
    }

    /// KV cache use the worker last reported, per mille (0 when unknown).
    pub fn kv_permille(&self) -> u32 {
        lock(&self.load).kv_permille
    }

    /// Requests in flight on this worker, as the router counts them.
    pub fn outstanding(&self) -> u32 {
        lock(&self.load).outstanding
    }

    pub fn routable(&self, now: Instant) -> bool {
        lock(&self.health).routable(now)
    }
}

/// A stable id for a worker name (keys the router's prefix estimate).
fn id_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A request's features, as the router needs them.
#[derive(Clone, Debug, Default)]
pub struct Pick<'a> {
    pub model: &'a str,
    pub blocks: &'a [u64],
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    pub session: Option<u64>,
    pub ttft_slo: Option<Nanos>,
    /// Workers already tried for this request.
    pub exclude: &'a [u64],
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickError {
    #[error("no healthy worker serves model {0:?} right now")]
    NoWorker(String),
    #[error("the fleet's retry budget is spent; not retrying")]
    RetryBudget,
}

pub struct Fleet {
    spec: FleetSpec,
    health_policy: HealthPolicy,
    members: RwLock<Vec<Arc<Member>>>,
    /// Every model name served (members' models and aliases), sorted.
    models: RwLock<Vec<String>>,
    routers: Mutex<HashMap<String, Router>>,
    /// Requests in flight through the fleet, and retries among them.
    active: Arc<AtomicU32>,
    retrying: Arc<AtomicU32>,
    pub metrics: FleetMetrics,
    /// The local engine's model, when this process has one.
    local_model: Option<String>,
}

impl Fleet {
    /// A fleet of `spec`'s workers plus, when `local_model` is set, this process's engine.
    pub fn new(
        spec: FleetSpec,
        local_model: Option<String>,
        metrics: FleetMetrics,
    ) -> Result<Fleet, String> {
        for name in spec.policies.values().chain([&spec.default_policy]) {
            if Policy::parse(name).is_none() {
                let all: Vec<&str> = Policy::ALL.iter().map(|p| p.as_str()).collect();
                return Err(format!(
                    "unknown routing policy {name:?}; use one of {}",
                    all.join(", ")
                ));
            }
        }
        for a in &spec.aliases {
            if let Some(b) = a
                .small_bands
                .iter()
                .find(|b| tokenfab_types::Band::parse(b).is_none())
            {
                return Err(format!(
                    "alias {:?}: small_bands has {b:?}; use interactive, standard or batch",
                    a.name
                ));
            }
        }
        let health_policy = HealthPolicy {
            eject_after_failures: spec.eject_after_failures.max(1),
            eject_base: Duration::from_millis(spec.eject_base_ms),
            eject_max: Duration::from_millis(spec.eject_max_ms.max(spec.eject_base_ms)),
        };
        let fleet = Fleet {
            health_policy,
            members: RwLock::new(Vec::new()),
            models: RwLock::new(Vec::new()),
            routers: Mutex::new(HashMap::new()),
            active: Arc::new(AtomicU32::new(0)),
            retrying: Arc::new(AtomicU32::new(0)),
            metrics,
            local_model,
            spec,
        };
        fleet.set_workers(&fleet.spec.workers.clone())?;
        Ok(fleet)
    }

    pub fn spec(&self) -> &FleetSpec {
        &self.spec
    }

    /// Replace the remote members with `workers` (discovery calls this); members whose
    /// name and URL are unchanged keep their health, load and prefix estimate.
    pub fn set_workers(&self, workers: &[WorkerSpec]) -> Result<(), String> {
        let mut next: Vec<Arc<Member>> = Vec::new();
        if let Some(model) = &self.local_model {
            let local = WorkerSpec {
                name: "local".into(),
                models: vec![model.clone()],
                accelerator: "cpu".into(),
                ..WorkerSpec::default()
            };
            next.push(self.keep_or(&local, || MemberKind::Local));
        }
        for w in workers {
            if w.url.is_empty() || w.models.is_empty() {
                return Err(format!(
                    "fleet worker {:?} needs a url and at least one model",
                    w.display_name()
                ));
            }
            if !matches!(w.api.as_str(), "openai" | "anthropic") {
                return Err(format!(
                    "fleet worker {:?}: api must be `openai` or `anthropic`, not {:?}",
                    w.display_name(),
                    w.api
                ));
            }
            let spec = w.clone();
            let connect = Duration::from_millis(self.spec.connect_timeout_ms);
            let timeout = Duration::from_millis(self.spec.timeout_ms);
            next.push(self.keep_or(w, move || {
                MemberKind::Remote(Box::new(RemoteWorker::new(spec, connect, timeout)))
            }));
        }
        let mut names: Vec<&str> = next.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("two fleet workers are named {:?}", w[0]));
        }
        let gone: Vec<u64> = {
            let old = read(&self.members);
            old.iter()
                .filter(|o| !next.iter().any(|n| n.id == o.id))
                .map(|o| o.id)
                .collect()
        };
        for r in lock(&self.routers).values_mut() {
            for id in &gone {
                r.forget(*id);
            }
        }
        for m in &next {
            self.metrics
                .init_worker(&m.name, &m.accelerator, self.policy_names());
        }
        let mut models: Vec<String> = next
            .iter()
            .flat_map(|m| m.models.iter().cloned())
            .chain(self.spec.aliases.iter().map(|a| a.name.clone()))
            .collect();
        models.sort();
        models.dedup();
        *write(&self.members) = next;
        *write(&self.models) = models;
        Ok(())
    }

    fn keep_or(&self, spec: &WorkerSpec, make: impl FnOnce() -> MemberKind) -> Arc<Member> {
        let name = spec.display_name();
        let old = read(&self.members);
        let same = old.iter().find(|m| {
            m.name == name
                && match &m.kind {
                    MemberKind::Local => spec.url.is_empty(),
                    MemberKind::Remote(r) => r.spec == *spec,
                }
        });
        match same {
            Some(m) => m.clone(),
            None => Arc::new(Member::new(make(), spec, self.health_policy)),
        }
    }

    pub fn members(&self) -> Vec<Arc<Member>> {
        read(&self.members).clone()
    }

    /// Every model name clients may ask for: served models and aliases.
    pub fn models(&self) -> Vec<String> {
        read(&self.models).clone()
    }

    pub fn serves(&self, model: &str) -> bool {
        read(&self.models)
            .binary_search_by(|m| m.as_str().cmp(model))
            .is_ok()
    }

    /// The model an alias stands for, given the request's size and band; other names as
    /// they are.
    pub fn resolve<'a>(
        &'a self,
        model: &'a str,
        (prompt_tokens, max_tokens): (u64, u64),
        band: tokenfab_types::Band,
    ) -> &'a str {
        match self.spec.aliases.iter().find(|a| a.name == model) {
            Some(a) if is_small(a, prompt_tokens, max_tokens, band) => &a.small,
            Some(a) => &a.large,
            None => model,
        }
    }

    /// Whether a request for `asked` may be served by `model` (it is that model, or an
    /// alias with `model` as one side).
    pub fn may_resolve_to(&self, asked: &str, model: &str) -> bool {
        asked == model
            || self
                .spec
                .aliases
                .iter()
                .any(|a| a.name == asked && (a.small == model || a.large == model))
    }

    /// The policies in use (for metric label values).
    fn policy_names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self
            .spec
            .policies
            .values()
            .chain([&self.spec.default_policy])
            .filter_map(|p| Policy::parse(p))
            .map(Policy::as_str)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn policy_for(&self, model: &str) -> Policy {
        self.spec
            .policies
            .get(model)
            .and_then(|p| Policy::parse(p))
            .or_else(|| Policy::parse(&self.spec.default_policy))
            .unwrap_or(Policy::PrefixLoad)
    }

    /// Choose a worker for a request and take a lease on it (its load counts the request
    /// until the lease is dropped). A retry (`exclude` not empty) needs room in the retry
    /// budget: at most max(3, 20 % of requests in flight) retries at once.
    pub fn pick(&self, p: &Pick<'_>, retry_reason: Option<&str>) -> Result<Lease, PickError> {
        let retry = match retry_reason {
            Some(reason) => {
                let active = self.active.load(Ordering::Relaxed);
                let budget = (active / 5).max(3);
                if self.retrying.fetch_add(1, Ordering::AcqRel) >= budget {
                    self.retrying.fetch_sub(1, Ordering::AcqRel);
                    return Err(PickError::RetryBudget);
                }
                self.metrics.retries.with_label_values(&[reason]).inc();
                Some(RetryToken(self.retrying.clone()))
            }
            None => None,
        };
        let now = Instant::now();
        let members = self.members();
        let eligible: Vec<&Arc<Member>> = members
            .iter()
            .filter(|m| m.models.iter().any(|x| x == p.model) && !p.exclude.contains(&m.id))
            .filter(|m| m.routable(now))
            .collect();
        let Some(tier) = eligible.iter().map(|m| m.tier).min() else {
            return Err(PickError::NoWorker(p.model.to_owned()));
        };
        let candidates: Vec<&Arc<Member>> =
            eligible.into_iter().filter(|m| m.tier == tier).collect();
        let loads: Vec<WorkerLoad> = candidates.iter().map(|m| m.view()).collect();
        let policy = self.policy_for(p.model);
        let req = RouteRequest {
            blocks: p.blocks,
            prompt_tokens: p.prompt_tokens,
            max_tokens: p.max_tokens,
            session: p.session,
            ttft_slo: p.ttft_slo,
        };
        let decision = {
            let mut routers = lock(&self.routers);
            let router = routers.entry(p.model.to_owned()).or_insert_with(|| {
                Router::new(policy, self.spec.prefix_blocks_per_worker, BLOCK_TOKENS)
            });
            let d = router
                .route(&req, &loads)
                .ok_or_else(|| PickError::NoWorker(p.model.to_owned()))?;
            router.record_sent(loads[d.chosen].id, p.blocks);
            d
        };
        let member = candidates[decision.chosen].clone();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let scores: Vec<String> = decision
                .scores
                .iter()
                .map(|s| {
                    format!(
                        "{}: cached_blocks={} predicted_ttft_ms={:.1} cost={}",
                        candidates[s.index].name,
                        s.cached_blocks,
                        s.predicted_ttft.0 as f64 / 1e6,
                        s.cost
                    )
                })
                .collect();
            tracing::debug!(
                model = p.model,
                policy = policy.as_str(),
                worker = member.name,
                reason = decision.reason,
                scores = scores.join("; "),
                "routed"
            );
        }
        self.metrics
            .decisions
            .with_label_values(&[policy.as_str(), &member.name, decision.reason])
            .inc();
        // The worker computes only what it does not hold.
        let prefill = decision
            .chosen_score()
            .map_or(p.prompt_tokens, |s| s.uncached_tokens);
        Ok(Lease::new(self, member, (prefill, p.max_tokens), retry))
    }

    /// Run active health checks until the process ends (spawn on the runtime).
    pub async fn check_health(self: Arc<Self>) {
        let every = Duration::from_millis(self.spec.health_interval_ms.max(50));
        let timeout = every.min(Duration::from_secs(2));
        loop {
            let members = self.members();
            let checks = members.iter().filter_map(|m| {
                let r = m.remote().filter(|r| r.spec.health_check)?;
                Some(async move { (m, r.check(timeout).await) })
            });
            for (m, result) in futures::future::join_all(checks).await {
                let now = Instant::now();
                let change = match &result {
                    Ok(kv) => {
                        lock(&m.load).kv_permille = kv.unwrap_or(0);
                        lock(&m.health).checked(true, now)
                    }
                    Err(e) => {
                        tracing::debug!(worker = m.name, error = e, "health check failed");
                        lock(&m.health).checked(false, now)
                    }
                };
                report(
                    &self.metrics,
                    m,
                    change,
                    result.as_ref().err().map(String::as_str),
                );
            }
            for m in &members {
                let up = m.routable(Instant::now());
                self.metrics
                    .worker_up
                    .with_label_values(&[&m.name, &m.accelerator])
                    .set(i64::from(up));
                self.metrics
                    .worker_outstanding
                    .with_label_values(&[&m.name])
                    .set(i64::from(m.outstanding()));
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Tokens one routing block stands for (blocks are 64 bytes of prompt text ≈ 16 tokens).
pub const BLOCK_TOKENS: u64 = 16;
/// Bytes of prompt text per routing block.
pub const BLOCK_BYTES: usize = 64;

fn is_small(
    a: &AliasSpec,
    prompt_tokens: u64,
    max_tokens: u64,
    band: tokenfab_types::Band,
) -> bool {
    prompt_tokens <= a.small_max_prompt_tokens
        && max_tokens <= a.small_max_tokens
        && (a.small_bands.is_empty() || a.small_bands.iter().any(|b| b == band.as_str()))
}

/// Holds one retry slot of the budget while the retried request runs.
struct RetryToken(Arc<AtomicU32>);

impl Drop for RetryToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's claim on a worker: the worker's load counts it until dropped, and what
/// happened to it (first token, failure) reaches the worker's health.
pub struct Lease {
    pub member: Arc<Member>,
    active: Arc<AtomicU32>,
    metrics: FleetMetrics,
    prompt: u64,
    decode: u64,
    first: bool,
    outcome: Option<Failure>,
    _retry: Option<RetryToken>,
}

impl Lease {
    fn new(
        fleet: &Fleet,
        member: Arc<Member>,
        (prefill, max_tokens): (u64, u64),
        retry: Option<RetryToken>,
    ) -> Lease {
        {
            let mut l = lock(&member.load);
            l.outstanding += 1;
            l.queued_prefill += prefill;
            l.outstanding_decode += max_tokens;
        }
        fleet.active.fetch_add(1, Ordering::AcqRel);
        Lease {
            member,
            active: fleet.active.clone(),
            metrics: fleet.metrics.clone(),
            prompt: prefill,
            decode: max_tokens,
            first: false,
            outcome: None,
            _retry: retry,
        }
    }

    pub fn worker(&self) -> &str {
        &self.member.name
    }

    /// A token arrived: the prompt is no longer queued for prefill.
    pub fn token(&mut self) {
        let mut l = lock(&self.member.load);
        if !self.first {
            self.first = true;
            l.queued_prefill = l.queued_prefill.saturating_sub(self.prompt);
        }
        if self.decode > 0 {
            self.decode -= 1;
            l.outstanding_decode = l.outstanding_decode.saturating_sub(1);
        }
    }

    /// The worker failed this request; recorded against its health when the lease ends.
    pub fn fail(&mut self, e: &WorkerError) {
        let kind = match e.failure {
            Failure::Broken => "broken",
            Failure::Busy => "busy",
            Failure::Rejected => "rejected",
        };
        self.metrics
            .failures
            .with_label_values(&[&self.member.name, kind])
            .inc();
        self.outcome = Some(e.failure);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut l = lock(&self.member.load);
            l.outstanding = l.outstanding.saturating_sub(1);
            if !self.first {
                l.queued_prefill = l.queued_prefill.saturating_sub(self.prompt);
            }
            l.outstanding_decode = l.outstanding_decode.saturating_sub(self.decode);
        }
        self.active.fetch_sub(1, Ordering::AcqRel);
        if matches!(self.member.kind, MemberKind::Local) {
            return;
        }
        let change = {
            let mut h = lock(&self.member.health);
            match self.outcome {
                Some(Failure::Broken) => h.failure(Instant::now()),
                // Busy or a bad request says nothing about the worker's health.
                Some(_) => Change::None,
                None if self.first => h.success(),
                None => Change::None,
            }
        };
        report(&self.metrics, &self.member, change, None);
    }
}

/// Log and count a health change.
fn report(metrics: &FleetMetrics, m: &Member, change: Change, why: Option<&str>) {
    let up = metrics
        .worker_up
        .with_label_values(&[&m.name, &m.accelerator]);
    match change {
        Change::None => {}
        Change::Ejected(backoff) => {
            metrics.ejections.with_label_values(&[&m.name]).inc();
            up.set(0);
            tracing::warn!(
                worker = m.name,
                backoff_ms = backoff.as_millis() as u64,
                reason = why.unwrap_or("consecutive failures"),
                "worker ejected"
            );
        }
        Change::Readmitted => {
            up.set(1);
            tracing::info!(worker = m.name, "worker readmitted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(workers: usize) -> Fleet {
        let spec = FleetSpec {
            workers: (0..workers)
                .map(|i| WorkerSpec {
                    name: format!("w{i}"),
                    url: format!("http://127.0.0.1:{}", 1 + i),
                    models: vec!["m".into()],
                    ..WorkerSpec::default()
                })
                .collect(),
            default_policy: "round-robin".into(),
            ..FleetSpec::default()
        };
        let metrics = FleetMetrics::new(&prometheus::Registry::new()).expect("metrics");
        Fleet::new(spec, None, metrics).expect("fleet")
    }

    fn pick<'a>(exclude: &'a [u64]) -> Pick<'a> {
        Pick {
            model: "m",
            prompt_tokens: 10,
            max_tokens: 5,
            exclude,
            ..Pick::default()
        }
    }

    #[test]
    fn retries_in_flight_stay_within_max_3_or_a_fifth_of_active_requests() {
        let f = fleet(2);
        let mut held: Vec<Lease> = (0..3)
            .map(|_| f.pick(&pick(&[]), Some("broken")).expect("within budget"))
            .collect();
        assert_eq!(
            f.pick(&pick(&[]), Some("broken")).err(),
            Some(PickError::RetryBudget),
            "a 4th concurrent retry with few requests active"
        );
        held.pop();
        held.push(
            f.pick(&pick(&[]), Some("broken"))
                .expect("a slot came back"),
        );
        // 40 requests active: a budget of 8, and each retry is itself active (45 → 9).
        let busy: Vec<Lease> = (0..37)
            .map(|_| f.pick(&pick(&[]), None).expect("pick"))
            .collect();
        let more: Vec<Lease> = (0..6)
            .map(|_| f.pick(&pick(&[]), Some("busy")).expect("20% of active"))
            .collect();
        assert_eq!(f.retrying.load(Ordering::Relaxed), 9);
        assert_eq!(
            f.pick(&pick(&[]), Some("busy")).err(),
            Some(PickError::RetryBudget)
        );
        drop((busy, more, held));
        assert_eq!(f.active.load(Ordering::Relaxed), 0);
        assert_eq!(f.retrying.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_lease_counts_load_until_dropped_and_excluded_workers_are_skipped() {
        let f = fleet(2);
        let a = f.pick(&pick(&[]), None).expect("pick");
        let first = a.member.id;
        assert_eq!(a.member.outstanding(), 1);
        let b = f.pick(&pick(&[first]), None).expect("pick");
        assert_ne!(b.member.id, first);
        let both = [first, b.member.id];
        assert_eq!(
            f.pick(&pick(&both), None).err(),
            Some(PickError::NoWorker("m".into()))
        );
        let m = a.member.clone();
        drop(a);
        assert_eq!(m.outstanding(), 0);
    }
}
