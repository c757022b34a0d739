//! Engine series, declared once here. Names follow vLLM's where vLLM has one, so routers
//! that read vLLM metrics (llm-d, Dynamo) read ours; the rest are `tokenfab_engine_*`.
//! Labels are bounded: `model_name` (constant per engine), `band`, `finished_reason`.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::time::Duration;
use tokenfab_sched::{Band, FinishReason, SchedSnapshot, SchedStats};

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    20.0, 40.0, 80.0,
];

#[derive(Clone)]
pub struct EngineMetrics {
    pub(crate) running: IntGauge,
    pub(crate) waiting: IntGauge,
    pub(crate) waiting_band: IntGaugeVec,
    pub(crate) kv_usage: prometheus::Gauge,
    pub(crate) kv_blocks_total: IntGauge,
    pub(crate) preemptions: IntCounter,
    pub(crate) prompt_tokens: IntCounter,
    pub(crate) generation_tokens: IntCounter,
    pub(crate) delivered_tokens: IntCounter,
    pub(crate) rejected: IntCounter,
    pub(crate) success: IntCounterVec,
    pub(crate) ttft: Histogram,
    pub(crate) itl: Histogram,
    pub(crate) e2e: Histogram,
    pub(crate) queue_time: Histogram,
    pub(crate) queue_time_band: HistogramVec,
    pub(crate) step_time: Histogram,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    evictions: IntCounter,
    quiet_starts: IntCounter,
    cached_seqs: IntGauge,
    /// The scheduler's counters at the last publish, to turn them into increments.
    last: std::sync::Arc<std::sync::Mutex<SchedStats>>,
}

impl EngineMetrics {
    /// Register the engine series for `model` in `registry`.
    pub fn new(registry: &Registry, model: &str) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model);
        let hist = |name: &str, help: &str| {
            HistogramOpts::new(name, help)
                .const_label("model_name", model)
                .buckets(LATENCY_BUCKETS.to_vec())
        };
        let m = EngineMetrics {
            running: IntGauge::with_opts(opts(
                "vllm:num_requests_running",
                "Requests in the running batch.",
            ))?,
            waiting: IntGauge::with_opts(opts(
                "vllm:num_requests_waiting",
                "Requests waiting in the queue.",
            ))?,
            waiting_band: IntGaugeVec::new(
                opts(
                    "tokenfab_engine_requests_waiting",
                    "Requests waiting, by band.",
                ),
                &["band"],
            )?,
            kv_usage: prometheus::Gauge::with_opts(opts(
                "vllm:kv_cache_usage_perc",
                "Fraction of KV blocks in use (1 = full).",
            ))?,
            kv_blocks_total: IntGauge::with_opts(opts(
                "tokenfab_engine_kv_blocks",
                "KV blocks the engine manages.",
            ))?,
            preemptions: IntCounter::with_opts(opts(
                "vllm:num_preemptions_total",
                "Sequences preempted (recomputed) because KV ran out.",
            ))?,
            prompt_tokens: IntCounter::with_opts(opts(
                "vllm:prompt_tokens_total",
                "Prompt tokens prefilled (recomputation included).",
            ))?,
            generation_tokens: IntCounter::with_opts(opts(
                "vllm:generation_tokens_total",
                "Tokens sampled.",
            ))?,
            delivered_tokens: IntCounter::with_opts(opts(
                "tokenfab_engine_delivered_tokens_total",
                "Completion tokens handed to a live request (what the gateway bills; excludes end-of-generation tokens and tokens of requests already cancelled).",
            ))?,
            rejected: IntCounter::with_opts(opts(
                "tokenfab_engine_requests_rejected_total",
                "Requests rejected or shed by admission.",
            ))?,
            success: IntCounterVec::new(
                opts(
                    "vllm:request_success_total",
                    "Requests finished, by reason.",
                ),
                &["finished_reason"],
            )?,
            ttft: Histogram::with_opts(hist(
                "vllm:time_to_first_token_seconds",
                "Time from arrival at the engine to the first sampled token.",
            ))?,
            itl: Histogram::with_opts(hist(
                "vllm:inter_token_latency_seconds",
                "Time between consecutive sampled tokens of one request.",
            ))?,
            e2e: Histogram::with_opts(hist(
                "vllm:e2e_request_latency_seconds",
                "Time from arrival at the engine to the end of the request.",
            ))?,
            queue_time: Histogram::with_opts(hist(
                "vllm:request_queue_time_seconds",
                "Time from arrival to the first scheduled step.",
            ))?,
            queue_time_band: HistogramVec::new(
                hist(
                    "tokenfab_engine_queue_time_seconds",
                    "Time from arrival to the first scheduled step, by priority band.",
                ),
                &["band"],
            )?,
            step_time: Histogram::with_opts(hist(
                "tokenfab_engine_step_seconds",
                "Duration of one executor step.",
            ))?,
            prefix_queries: IntCounter::with_opts(opts(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ))?,
            prefix_hits: IntCounter::with_opts(opts(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (not recomputed).",
            ))?,
            evictions: IntCounter::with_opts(opts(
                "tokenfab_engine_prefix_cache_evictions_total",
                "Prefix-cache entries evicted to make room.",
            ))?,
            quiet_starts: IntCounter::with_opts(opts(
                "tokenfab_engine_quiet_starts_total",
                "Steps that started a quiet tenant's request with busier tenants' work held.",
            ))?,
            cached_seqs: IntGauge::with_opts(opts(
                "tokenfab_engine_prefix_cache_entries",
                "Finished sequences kept for their cached prefixes.",
            ))?,
            last: Default::default(),
        };
        registry.register(Box::new(m.running.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        registry.register(Box::new(m.waiting_band.clone()))?;
        registry.register(Box::new(m.kv_usage.clone()))?;
        registry.register(Box::new(m.kv_blocks_total.clone()))?;
        registry.register(Box::new(m.preemptions.clone()))?;
        registry.register(Box::new(m.prompt_tokens.clone()))?;
        registry.register(Box::new(m.generation_tokens.clone()))?;
        registry.register(Box::new(m.delivered_tokens.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.success.clone()))?;
        registry.register(Box::new(m.ttft.clone()))?;
        registry.register(Box::new(m.itl.clone()))?;
        registry.register(Box::new(m.e2e.clone()))?;
        registry.register(Box::new(m.queue_time.clone()))?;
        registry.register(Box::new(m.queue_time_band.clone()))?;
        registry.register(Box::new(m.step_time.clone()))?;
        registry.register(Box::new(m.prefix_queries.clone()))?;
        registry.register(Box::new(m.prefix_hits.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        registry.register(Box::new(m.quiet_starts.clone()))?;
        registry.register(Box::new(m.cached_seqs.clone()))?;
        Ok(m)
    }

    pub(crate) fn set_gauges(&self, s: &SchedSnapshot, stats: &SchedStats) {
        self.running.set(i64::from(s.running));
        self.waiting
            .set(s.waiting.iter().map(|w| i64::from(*w)).sum());
        for b in Band::ALL {
            self.waiting_band
                .with_label_values(&[b.as_str()])
                .set(i64::from(s.waiting[b.index()]));
        }
        let total = f64::from(s.kv_blocks_total.max(1));
        self.kv_usage.set(f64::from(s.kv_blocks_used) / total);
        self.kv_blocks_total.set(i64::from(s.kv_blocks_total));
        self.cached_seqs.set(i64::from(s.cached_seqs));
        if let Ok(mut last) = self.last.lock() {
            self.preemptions
                .inc_by(stats.preemptions.saturating_sub(last.preemptions));
            self.prefix_queries.inc_by(
                stats
                    .prefix_query_tokens
                    .saturating_sub(last.prefix_query_tokens),
            );
            self.prefix_hits.inc_by(
                stats
                    .prefix_hit_tokens
                    .saturating_sub(last.prefix_hit_tokens),
            );
            self.evictions
                .inc_by(stats.evictions.saturating_sub(last.evictions));
            self.quiet_starts
                .inc_by(stats.quiet_starts.saturating_sub(last.quiet_starts));
            *last = stats.clone();
        }
    }

    pub(crate) fn observe_finish(&self, reason: FinishReason, e2e: Duration) {
        let label = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "abort",
        };
        self.success.with_label_values(&[label]).inc();
        self.e2e.observe(e2e.as_secs_f64());
    }
}
