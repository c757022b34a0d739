//! Logs and traces for the binary: `tracing` to stderr (human or JSON lines) and, when an
//! OTLP endpoint is configured, an OpenTelemetry layer that exports every span over
//! OTLP/HTTP (protobuf) from a background batch thread. Request spans come from
//! `tokenfab_gateway::trace`; here a client's W3C `traceparent` is made their parent.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Flushes and stops trace export when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("trace export shutdown: {e}");
            }
        }
    }
}

/// The OTLP/HTTP traces URL for a collector base URL.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Install the global subscriber. `otlp_endpoint` empty = logs only; otherwise
/// `sample_ratio` of requests are traced, at most `max_per_second` (see `trace_sampling`).
pub fn init(
    json: bool,
    otlp_endpoint: &str,
    sample_ratio: f64,
    max_per_second: u64,
) -> anyhow::Result<Telemetry> {
    crate::trace_sampling::configure(sample_ratio, max_per_second)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let mut provider = None;
    let otel = if otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(otlp_endpoint))
            .build()?;
        let p = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("tokenfab")
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = p.tracer("tokenfab");
        provider = Some(p);
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tokenfab_gateway::trace::set_parent_extractor(parent_from_headers);
        tokenfab_gateway::trace::set_context_injector(context_to_headers);
        tokenfab_gateway::trace::set_sampler(crate::trace_sampling::sample);
        // Its own filter: `RUST_LOG` quiets the log, never the traces (a global filter
        // at `warn` used to drop every request span, so nothing was exported).
        // Spans of requests not sampled are never seen by it (`trace_sampling`).
        let spans = tracing_subscriber::filter::Targets::new()
            .with_target("tokenfab", tracing::Level::INFO)
            .with_target(
                tokenfab_gateway::trace::UNTRACED,
                tracing::level_filters::LevelFilter::OFF,
            );
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(spans),
        )
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    if !otlp_endpoint.is_empty() {
        tracing::info!(endpoint = %traces_url(otlp_endpoint), "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

struct Headers<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A client's `traceparent` (W3C Trace Context) becomes the parent of `span`.
fn parent_from_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    span.set_parent(cx);
}

/// `span`'s trace context as `traceparent` (and `tracestate`) headers.
fn context_to_headers(span: &tracing::Span) -> Vec<(String, String)> {
    let mut out = std::collections::HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut out));
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            super::traces_url("http://c:4318"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            super::traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
