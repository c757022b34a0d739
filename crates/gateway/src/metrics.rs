//! Gateway and ledger series, declared once here (engine series: `engine/src/metrics.rs`;
//! every name is listed in docs/metrics.md, which a test keeps in step with `/metrics`).
//!
//! Labels are bounded: `route` is the matched route pattern (or `unmatched`), `status` the
//! HTTP status code, `model` the served model name, `band` one of three priority bands,
//! `outcome` one of `completed|failed|cancelled`, `kind` one of `prompt|cached|completion`.
//! No tenant or key label: per-tenant numbers come from the ledger (`/admin/v1/usage`).

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenfab_ledger::{Outcome, Settled, TokenUsage};
use tokenfab_types::Band;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The gateway's series: a handle to one shared [`Series`], so the copies the `track`
/// middleware's state and each request's timer take cost an atomic increment.
#[derive(Clone)]
pub struct GatewayMetrics(Arc<Series>);

impl std::ops::Deref for GatewayMetrics {
    type Target = Series;

    fn deref(&self) -> &Series {
        &self.0
    }
}

#[derive(Clone)]
pub struct Series {
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    requests: IntCounterVec,
    ttft: HistogramVec,
    inter_token: HistogramVec,
    e2e: HistogramVec,
    tokens: IntCounterVec,
    cost: IntCounterVec,
    settle: HistogramVec,
    /// Reservations open in the ledger, read at scrape time.
    pub open_reservations: IntGauge,
    /// The last few error responses, for the dashboard: (unix ms, route, status).
    errors: Arc<Mutex<VecDeque<(u64, String, u16)>>>,
    /// Off: no per-request updates at all (to measure what they cost).
    enabled: bool,
}

/// Error responses the dashboard lists.
const RECENT_ERRORS: usize = 20;

impl GatewayMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let hist = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
        };
        let m = Series {
            http_requests: IntCounterVec::new(
                Opts::new(
                    "tokenfab_http_requests_total",
                    "HTTP requests by route and status.",
                ),
                &["route", "status"],
            )?,
            http_duration: hist(
                "tokenfab_http_request_duration_seconds",
                "Time to the response head (streams: until headers are sent).",
                &["route"],
                &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "tokenfab_gateway_requests_total",
                    "Admitted generation requests by how they ended.",
                ),
                &["model", "band", "outcome"],
            )?,
            ttft: hist(
                "tokenfab_gateway_time_to_first_token_seconds",
                "From the request reaching its handler to its first text (auth, limits, ledger and queue included).",
                &["model", "band"],
                LATENCY_BUCKETS,
            )?,
            inter_token: hist(
                "tokenfab_gateway_inter_token_seconds",
                "Between consecutive pieces of text released to a client.",
                &["model"],
                LATENCY_BUCKETS,
            )?,
            e2e: hist(
                "tokenfab_gateway_e2e_request_seconds",
                "From the request reaching its handler to its settlement.",
                &["model", "band"],
                LATENCY_BUCKETS,
            )?,
            tokens: IntCounterVec::new(
                Opts::new(
                    "tokenfab_gateway_tokens_total",
                    "Tokens billed, by kind (cached is the part of prompt served from the prefix cache).",
                ),
                &["model", "kind"],
            )?,
            cost: IntCounterVec::new(
                Opts::new(
                    "tokenfab_gateway_cost_nano_usd_total",
                    "Cost confirmed in the ledger, nano-USD.",
                ),
                &["model"],
            )?,
            settle: hist(
                "tokenfab_ledger_settle_seconds",
                "Time for a settlement to become durable in the ledger.",
                &["outcome"],
                &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0],
            )?,
            open_reservations: IntGauge::new(
                "tokenfab_ledger_open_reservations",
                "Reservations not yet settled, in the whole ledger.",
            )?,
            errors: Arc::default(),
            enabled: true,
        };
        registry.register(Box::new(m.http_requests.clone()))?;
        registry.register(Box::new(m.http_duration.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.ttft.clone()))?;
        registry.register(Box::new(m.inter_token.clone()))?;
        registry.register(Box::new(m.e2e.clone()))?;
        registry.register(Box::new(m.tokens.clone()))?;
        registry.register(Box::new(m.cost.clone()))?;
        registry.register(Box::new(m.settle.clone()))?;
        registry.register(Box::new(m.open_reservations.clone()))?;
        Ok(GatewayMetrics(Arc::new(m)))
    }

    /// The last error responses, newest first.
    pub(crate) fn recent_errors(&self) -> Vec<serde_json::Value> {
        self.errors.lock().map_or_else(
            |_| Vec::new(),
            |e| {
                e.iter()
                    .rev()
                    .map(|(at, route, status)| {
                        serde_json::json!({"at_ms": at, "route": route, "status": status})
                    })
                    .collect()
            },
        )
    }

    fn note_error(&self, route: &str, status: u16) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() == RECENT_ERRORS {
                e.pop_front();
            }
            e.push_back((at, route.to_owned(), status));
        }
    }

    /// The same series, never updated by requests (`observability.metrics = false`).
    pub fn disabled(mut self) -> Self {
        Arc::make_mut(&mut self.0).enabled = false;
        self
    }

    /// Start timing a generation request whose span (`trace.rs`) is `span`.
    pub(crate) fn request(&self, model: &str, band: Band, span: tracing::Span) -> RequestTimer {
        let phase = crate::child_span!(&span, "queue");
        RequestTimer {
            metrics: self.enabled.then(|| self.clone()),
            model: model.to_owned(),
            band,
            started: Instant::now(),
            last_piece: None,
            scheduled: false,
            span,
            phase,
        }
    }
}

/// One generation request's timings, recorded as it goes, and its trace: the request span
/// (kept open until the request is settled, also for streams that outlive their handler)
/// and the current phase under it: `queue` (admission, routing and the engine's queue)
/// until the engine first schedules it, `prefill` until the first text, then `decode`.
pub(crate) struct RequestTimer {
    metrics: Option<GatewayMetrics>,
    model: String,
    band: Band,
    started: Instant,
    last_piece: Option<Instant>,
    scheduled: bool,
    span: tracing::Span,
    phase: tracing::Span,
}

impl RequestTimer {
    /// A span for the ledger settlement, under the request's span.
    pub(crate) fn settle_span(&self) -> tracing::Span {
        crate::child_span!(&self.span, "settle")
    }

    /// The engine took the request out of its queue.
    pub(crate) fn scheduled(&mut self) {
        if !self.scheduled && self.last_piece.is_none() {
            self.scheduled = true;
            self.phase = crate::child_span!(&self.span, "prefill");
        }
    }

    /// A piece of text is about to be released.
    pub(crate) fn piece(&mut self) {
        if self.last_piece.is_none() {
            self.phase = crate::child_span!(&self.span, "decode");
        }
        let now = Instant::now();
        if let Some(m) = &self.metrics {
            match self.last_piece {
                None => m
                    .ttft
                    .with_label_values(&[&self.model, self.band.as_str()])
                    .observe(secs(now - self.started)),
                Some(prev) => m
                    .inter_token
                    .with_label_values(&[&self.model])
                    .observe(secs(now - prev)),
            }
        }
        self.last_piece = Some(now);
    }

    /// The request ended: `settled` is the ledger's answer and how long it took (when a
    /// ledger is kept).
    pub(crate) fn end(
        &self,
        outcome: Outcome,
        usage: TokenUsage,
        settled: Option<(Settled, Duration)>,
    ) {
        let band = self.band.as_str();
        self.span
            .record("gen_ai.usage.input_tokens", usage.prompt.0);
        self.span
            .record("gen_ai.usage.output_tokens", usage.completion.0);
        self.span.record("tokenfab.outcome", outcome.as_str());
        if let Some((s, _)) = &settled {
            self.span.record("tokenfab.cost_nano_usd", s.cost.0);
        }
        let Some(m) = &self.metrics else {
            return;
        };
        m.requests
            .with_label_values(&[&self.model, band, outcome.as_str()])
            .inc();
        m.e2e
            .with_label_values(&[&self.model, band])
            .observe(secs(self.started.elapsed()));
        for (kind, n) in [
            ("prompt", usage.prompt.0),
            ("cached", usage.cached.0),
            ("completion", usage.completion.0),
        ] {
            m.tokens.with_label_values(&[&self.model, kind]).inc_by(n);
        }
        if let Some((s, took)) = settled {
            m.cost.with_label_values(&[&self.model]).inc_by(s.cost.0);
            m.settle
                .with_label_values(&[outcome.as_str()])
                .observe(secs(took));
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(crate) async fn track(State(m): State<GatewayMetrics>, req: Request, next: Next) -> Response {
    if !m.enabled {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    m.http_duration
        .with_label_values(&[&route])
        .observe(t0.elapsed().as_secs_f64());
    m.http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    if resp.status().is_client_error() || resp.status().is_server_error() {
        m.note_error(&route, resp.status().as_u16());
    }
    resp
}
