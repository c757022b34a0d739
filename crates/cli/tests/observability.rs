//! Observability over a real server (timing-model engine): the metrics catalog in
//! ARCHITECTURE.md matches what `/metrics` exposes, the exposition passes `promtool check
//! metrics` (Debian `prometheus`), and the gateway's LLM series count what happened.

mod common;

use common::value;

use common::client;
use serde_json::json;
use std::collections::BTreeSet;

const ADMIN: &str = "obs-admin-key-0123456789";

/// Series names in ARCHITECTURE.md's metrics table.
fn catalog() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../ARCHITECTURE.md"
    ))
    .expect("read ARCHITECTURE.md");
    let section = doc
        .split("\n## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Metrics section");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split(['`', '{']).next())
        .map(str::to_owned)
        .collect()
}

/// Series names in a Prometheus exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_catalog_matches_the_exposition_and_promtool_accepts_it() {
    let mut cfg = common::config();
    cfg.model.mock = "linear:1:100".into();
    cfg.gateway.admin_key = ADMIN.into();
    // A fleet of just the local engine (an alias turns it on), so its series exist too.
    cfg.fleet.aliases.push(tokenfab_fleet::AliasSpec {
        name: "auto".into(),
        small: "mock".into(),
        large: "mock".into(),
        ..tokenfab_fleet::AliasSpec::default()
    });
    let url = common::serve_mock(cfg).await;
    let (_, key) = common::create_key(&url, ADMIN, json!({"tenant": "obs"})).await;
    let body = |stream: bool| {
        json!({"model": "mock", "max_tokens": 6, "stream": stream,
               "messages": [{"role": "user", "content": "hello"}]})
    };
    for stream in [true, false, true, false] {
        let r = common::call(&url, Some(&key), &body(stream), &[]).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    // A request refused at admission is an HTTP 429, not an admitted request that ended.
    let (_, limited) = common::create_key(&url, ADMIN, json!({"tenant": "obs", "rpm": 1})).await;
    for expect in [200, 429] {
        let r = common::call(&url, Some(&limited), &body(false), &[]).await;
        assert_eq!(r.status().as_u16(), expect);
    }
    let text = common::scrape(&url).await;

    let (doc, live) = (catalog(), exposed(&text));
    let undocumented: Vec<_> = live.difference(&doc).collect();
    let missing: Vec<_> = doc.difference(&live).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "ARCHITECTURE.md's metrics table and /metrics disagree: exposed but not documented \
         {undocumented:?}; documented but not exposed {missing:?}"
    );

    // The LLM series count what happened.
    let completed = value(
        &text,
        "tokenfab_gateway_requests_total",
        &["outcome=\"completed\""],
    );
    assert_eq!(completed, 5.0, "{text}");
    let admitted = value(&text, "tokenfab_gateway_requests_total", &[]);
    assert_eq!(admitted, 5.0, "only admitted requests are counted there");
    let limited = value(&text, "tokenfab_http_requests_total", &["status=\"429\""]);
    assert_eq!(limited, 1.0);
    let billed = value(
        &text,
        "tokenfab_gateway_tokens_total",
        &["kind=\"completion\""],
    );
    let delivered = value(&text, "tokenfab_engine_delivered_tokens_total", &[]);
    assert_eq!(billed, 30.0);
    assert_eq!(
        billed, delivered,
        "billed completion tokens = engine's delivered"
    );
    let first_tokens = value(
        &text,
        "tokenfab_gateway_time_to_first_token_seconds_count",
        &[],
    );
    assert_eq!(first_tokens, 5.0);
    assert!(value(&text, "tokenfab_gateway_inter_token_seconds_count", &[]) >= 10.0);
    assert_eq!(
        value(&text, "tokenfab_ledger_settle_seconds_count", &[]),
        5.0
    );
    assert_eq!(value(&text, "tokenfab_ledger_open_reservations", &[]), 0.0);

    promtool(&text);
}

/// `promtool check metrics` on the exposition: it must parse, and the only lint allowed is
/// the `:` in vLLM's own series names (kept for routers that read them).
fn promtool(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var("TOKENFAB_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1") => {
            panic!("promtool required (TOKENFAB_REQUIRE_PROMTOOL=1) but: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED promtool check: {e} (apt-get install prometheus)");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("vllm:") && l.ends_with("metric names should not contain ':'")))
        .collect();
    assert!(
        problems.is_empty() && out.status.code() != Some(1),
        "promtool check metrics: {problems:?} (exit {:?})",
        out.status.code()
    );
}

/// Run headless Chromium (Debian `chromium`) on `url`; `args` pick the output
/// (`--dump-dom`, `--screenshot=…`). `None` (after saying why) when it cannot run here,
/// unless TOKENFAB_REQUIRE_CHROMIUM=1.
async fn chromium(url: &str, args: &[&str]) -> Option<String> {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ])
    .arg("--window-size=1280,1000")
    .args(args)
    .kill_on_drop(true);
    if !args.iter().any(|a| a.starts_with("--virtual-time-budget")) {
        cmd.arg("--virtual-time-budget=4000");
    }
    cmd.arg(url);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output()).await;
    match out {
        Ok(Ok(o)) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        other => {
            let why = format!("{other:?}");
            if std::env::var("TOKENFAB_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
                panic!("chromium required (TOKENFAB_REQUIRE_CHROMIUM=1) but: {why}");
            }
            eprintln!("SKIPPED dashboard browser test: chromium did not run: {why} (apt-get install chromium)");
            None
        }
    }
}

/// The number the dashboard shows in element `id` (its `data-value`).
fn shown(dom: &str, id: &str) -> Option<u64> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let v = rest.split("data-value=\"").nth(1)?.split('"').next()?;
    v.parse().ok()
}

/// The dashboard in a real browser: without the admin key it asks for it; with it, the
/// numbers it shows are the server's and they move when requests are served; a
/// screenshot is kept in the test's target directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_shows_live_numbers_in_chromium() {
    let mut worker = common::config();
    worker.model.mock = "linear:1:100".into();
    worker.worker = true;
    let worker = common::serve_mock(worker).await;
    let mut cfg = common::config();
    cfg.model.mock = "linear:1:100".into();
    cfg.gateway.admin_key = ADMIN.into();
    // A fleet: this engine plus one remote worker, both on the page.
    cfg.fleet.workers.push(tokenfab_fleet::WorkerSpec {
        name: "gpu-1".into(),
        url: worker,
        models: vec!["mock".into()],
        accelerator: "h100".into(),
        ..tokenfab_fleet::WorkerSpec::default()
    });
    let url = common::serve_mock(cfg).await;
    let page = format!("{url}/dashboard");
    let Some(locked) = chromium(&page, &["--dump-dom"]).await else {
        return;
    };
    assert!(
        locked.contains("admin key needed"),
        "without the admin key the data stays closed"
    );
    let with_key = format!("{page}#key={ADMIN}");
    let before = chromium(&with_key, &["--dump-dom"]).await.expect("dom");
    assert_eq!(shown(&before, "requests-total"), Some(0), "{before}");
    let (_, key) = common::create_key(&url, ADMIN, json!({"tenant": "dash"})).await;
    let body = json!({"model": "mock", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..5 {
        let r = common::call(&url, Some(&key), &body, &[]).await;
        assert_eq!(r.status(), 200);
    }
    let after = chromium(&with_key, &["--dump-dom"]).await.expect("dom");
    assert_eq!(shown(&after, "requests-total"), Some(5));
    // One live session: the page keeps polling while requests are served, and the count
    // it shows moves between its first and its last poll.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (url, key, body, busy) = (url.clone(), key.clone(), body.clone(), busy.clone());
        tokio::spawn(async move {
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                let r = common::call(&url, Some(&key), &body, &[]).await;
                assert_eq!(r.status(), 200);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let live = chromium(&with_key, &["--dump-dom", "--virtual-time-budget=60000"])
        .await
        .expect("dom");
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    load.await.expect("load");
    let attr = |name: &str| -> Option<u64> {
        let at = live.find("id=\"requests-total\"")?;
        live[at..]
            .split(&format!("{name}=\""))
            .nth(1)?
            .split('"')
            .next()?
            .parse()
            .ok()
    };
    let (first, last, polls) = (attr("data-first"), attr("data-value"), attr("data-polls"));
    assert!(polls.is_some_and(|p| p >= 2), "the page polled: {polls:?}");
    assert!(
        matches!((first, last), (Some(f), Some(l)) if l > f),
        "the count moved within one session: first {first:?}, last {last:?}"
    );
    assert_eq!(shown(&after, "tokens-completion"), Some(20));
    assert!(after.contains(">dash<"), "top tenants lists the tenant");
    assert!(
        after.contains(">gpu-1<") && after.contains(">remote<"),
        "the fleet's worker is listed"
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&with_key, &[&format!("--screenshot={}", shot.display())])
        .await
        .expect("screenshot");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "a screenshot of the page ({size} bytes)");
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// `deploy/`: the Prometheus config passes `promtool check config`, and every series the
/// Grafana dashboard queries is in the catalog (so renaming one breaks this test, not the
/// operator's dashboard).
#[test]
fn deploy_files_match_the_catalog() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let grafana: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/grafana-dashboard.json")).expect("read"),
    )
    .expect("the Grafana dashboard is JSON");
    let doc = catalog();
    let mut used = BTreeSet::new();
    for panel in grafana["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if word.starts_with("tokenfab_") || word.starts_with("vllm:") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    used.insert(base.to_owned());
                }
            }
        }
    }
    let unknown: Vec<_> = used.difference(&doc).collect();
    assert!(
        unknown.is_empty(),
        "the Grafana dashboard queries unknown series {unknown:?}"
    );
    assert!(
        used.len() >= 15,
        "the dashboard covers the catalog: {used:?}"
    );
    match std::process::Command::new("promtool")
        .args(["check", "config", &format!("{root}/prometheus.yml")])
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if std::env::var("TOKENFAB_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1") => {
            panic!("promtool required (TOKENFAB_REQUIRE_PROMTOOL=1) but: {e}")
        }
        Err(e) => eprintln!("SKIPPED promtool check config: {e}"),
    }
}

/// Spans received by the test's OTLP/HTTP receiver: (trace id, span id, parent span id,
/// name, string-valued attributes).
type Received = std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>;

#[derive(Clone, Debug)]
struct ReceivedSpan {
    trace_id: String,
    id: String,
    parent: String,
    name: String,
    attrs: std::collections::BTreeMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `tokenfab serve --mock linear:1:100` exporting to `collector` every 100 ms, with logs
/// quiet (`RUST_LOG=warn` must not silence the traces) and `extra` arguments; returns it
/// once `/health` answers, with its URL.
async fn serve_exporting(
    collector: &str,
    dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> (std::process::Child, String) {
    let port = common::free_port();
    let log = std::fs::File::create(dir.join("serve.log")).expect("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args(["serve", "--mock", "linear:1:100", "--ledger", "memory"])
        .args(["--port", &port.to_string(), "--otlp-endpoint", collector])
        .args(extra)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .expect("spawn tokenfab serve");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if client().get(format!("{url}/health")).send().await.is_ok() {
            return (child, url);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server not up at {url}");
}

/// A minimal OTLP/HTTP trace receiver (protobuf `ExportTraceServiceRequest`, the wire
/// format collectors accept); returns its base URL and what it received.
async fn otlp_receiver() -> (String, Received) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    use prost::Message;
    let got: Received = Default::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut spans = sink.lock().expect("lock");
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let attrs = s
                                .attributes
                                .iter()
                                .map(|kv| {
                                    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                        Some(V::StringValue(s)) => s.clone(),
                                        Some(V::IntValue(i)) => i.to_string(),
                                        Some(V::BoolValue(b)) => b.to_string(),
                                        Some(V::DoubleValue(d)) => d.to_string(),
                                        _ => String::new(),
                                    };
                                    (kv.key.clone(), v)
                                })
                                .collect();
                            spans.push(ReceivedSpan {
                                trace_id: hex(&s.trace_id),
                                id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                                name: s.name,
                                attrs,
                            });
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    (common::serve_router(app).await, got)
}

/// One trace per request, exported over OTLP to a real receiver: the client's
/// `traceparent` is the root's parent, the root carries the GenAI semantic-convention
/// attributes plus tenant, worker, cost and x-request-id, and admission, prefill, decode
/// and settlement are its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_is_one_otlp_trace_under_the_clients_traceparent() {
    let (collector, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let admin: [&std::ffi::OsStr; 2] = ["--admin-key".as_ref(), ADMIN.as_ref()];
    let (mut child, url) = serve_exporting(&collector, dir.path(), &admin).await;
    let (_, key) = common::create_key(&url, ADMIN, json!({"tenant": "traced"})).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let body = json!({"model": "mock", "max_tokens": 4, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let headers = [
        ("traceparent", traceparent.as_str()),
        ("x-request-id", "trace-test-1"),
    ];
    let r = common::call(&url, Some(&key), &body, &headers).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = received
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if ["admission", "queue", "prefill", "decode", "settle"]
            .iter()
            .all(|n| names.contains(n))
            && spans.iter().any(|s| s.parent == parent)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let root = spans
        .iter()
        .find(|s| s.parent == parent)
        .unwrap_or_else(|| panic!("no span under the client's traceparent: {spans:#?}"));
    assert_eq!(root.name, "POST /v1/chat/completions");
    let a = &root.attrs;
    assert_eq!(
        a.get("gen_ai.request.model").map(String::as_str),
        Some("mock")
    );
    assert_eq!(
        a.get("gen_ai.operation.name").map(String::as_str),
        Some("chat")
    );
    assert_eq!(
        a.get("gen_ai.usage.output_tokens").map(String::as_str),
        Some("4")
    );
    assert!(a.get("gen_ai.usage.input_tokens").is_some_and(|v| v != "0"));
    assert_eq!(a.get("tenant").map(String::as_str), Some("traced"));
    assert_eq!(
        a.get("x_request_id").map(String::as_str),
        Some("trace-test-1")
    );
    assert!(
        a.contains_key("worker") && a.contains_key("tokenfab.cost_nano_usd"),
        "{a:?}"
    );
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for phase in ["admission", "queue", "prefill", "decode", "settle"] {
        assert!(names.contains(phase), "span {phase} missing: {names:?}");
    }
}

/// Head sampling: with `trace_sample_ratio = 0.25`, a quarter of the requests that bring no
/// `traceparent` are traced, and a client's sampled flag decides for its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_ratio_traces_its_share_and_a_clients_flag_decides_its_own() {
    let (collector, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tokenfab.toml");
    std::fs::write(&config, "[observability]\ntrace_sample_ratio = 0.25\n").expect("config");
    let flag: [&std::ffi::OsStr; 2] = ["--config".as_ref(), config.as_ref()];
    let (mut child, url) = serve_exporting(&collector, dir.path(), &flag).await;
    let body = json!({"model": "mock", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..8 {
        assert_eq!(common::call(&url, None, &body, &[]).await.status(), 200);
    }
    let unsampled = "00-7bf92f3577b34da6a3ce929d0e0e4730-00f067aa0ba902b7-00";
    let sampled = "00-7bf92f3577b34da6a3ce929d0e0e4731-00f067aa0ba902b7-01";
    for tp in [unsampled, sampled] {
        let r = common::call(&url, None, &body, &[("traceparent", tp)]).await;
        assert_eq!(r.status(), 200);
    }
    let got = settled_traces(&received, 3).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        got.len(),
        3,
        "2 of 8 by ratio + the sampled client: {got:?}"
    );
    assert!(got.contains("7bf92f3577b34da6a3ce929d0e0e4731"), "{got:?}");
    assert!(!got.contains("7bf92f3577b34da6a3ce929d0e0e4730"), "{got:?}");
    let spans = received.lock().expect("lock").len();
    assert!(
        spans >= 3 * 5,
        "every traced request has its phase spans: {spans}"
    );
    // A share outside 0–1 is refused at start, naming the key.
    std::fs::write(&config, "[observability]\ntrace_sample_ratio = 2\n").expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args([
            "serve",
            "--mock",
            "instant",
            "--port",
            &common::free_port().to_string(),
        ])
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run tokenfab serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("trace_sample_ratio = 2"), "{err}");
}

/// The trace ids of the request spans received, once `at_least` arrived (or 10 s passed)
/// and several export periods more brought nothing else.
async fn settled_traces(received: &Received, at_least: usize) -> BTreeSet<String> {
    let roots = || -> BTreeSet<String> {
        received
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.name == "POST /v1/chat/completions")
            .map(|s| s.trace_id.clone())
            .collect()
    };
    for _ in 0..100 {
        if roots().len() >= at_least {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    roots()
}

/// `trace_max_per_second` bounds the traces started each second, for requests sampled by
/// the ratio and by a client's flag alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_budget_caps_traces_per_second_whatever_asks_for_them() {
    let (collector, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tokenfab.toml");
    std::fs::write(
        &config,
        "[observability]
trace_max_per_second = 2
",
    )
    .expect("config");
    let flag: [&std::ffi::OsStr; 2] = ["--config".as_ref(), config.as_ref()];
    let (mut child, url) = serve_exporting(&collector, dir.path(), &flag).await;
    let body = json!({"model": "mock", "max_tokens": 1,
                      "messages": [{"role": "user", "content": "hi"}]});
    let started = std::time::Instant::now();
    for i in 0..12 {
        let tp = format!("00-8bf92f3577b34da6a3ce929d0e0e47{i:02}-00f067aa0ba902b7-01");
        let headers: &[(&str, &str)] = if i % 2 == 0 {
            &[("traceparent", &tp)]
        } else {
            &[]
        };
        assert_eq!(common::call(&url, None, &body, headers).await.status(), 200);
    }
    let seconds = started.elapsed().as_secs();
    let got = settled_traces(&received, 2).await;
    let _ = child.kill();
    let _ = child.wait();
    // The requests fell in at most `seconds + 2` budget seconds of 2 traces each.
    let most = 2 * (seconds as usize + 2);
    assert!(
        (2..=most).contains(&got.len()) && got.len() < 12,
        "{} traces of 12 requests in {seconds} s: {got:?}",
        got.len()
    );
}

/// Through a routing gateway, the trace continues on the remote worker: the worker's
/// request span is a child of the gateway's `route` span, which is a child of the
/// gateway's request span under the client's `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_continues_on_the_remote_worker() {
    let (collector, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (wport, gport) = (common::free_port(), common::free_port());
    let (wp, gp) = (wport.to_string(), gport.to_string());
    let _worker = common::spawn(
        &[
            "worker",
            "--mock",
            "linear:1:100",
            "--port",
            &wp,
            "--otlp-endpoint",
            &collector,
        ],
        wport,
        &dir.path().join("worker.log"),
    )
    .await;
    let wurl = format!("http://127.0.0.1:{wport}=mock");
    let gw = common::spawn(
        &[
            "serve",
            "--model",
            "none",
            "--ledger",
            "memory",
            "--port",
            &gp,
            "--worker",
            &wurl,
            "--otlp-endpoint",
            &collector,
        ],
        gport,
        &dir.path().join("gateway.log"),
    )
    .await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let client_span = "10f067aa0ba902b8";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let body = json!({"model": "mock", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = common::call(&gw.url, None, &body, &[("traceparent", &traceparent)]).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let find = || -> Option<(ReceivedSpan, ReceivedSpan, ReceivedSpan)> {
        let spans: Vec<ReceivedSpan> = received
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let root = spans.iter().find(|s| s.parent == client_span)?.clone();
        let route = spans
            .iter()
            .find(|s| s.name == "route" && s.parent == root.id)?
            .clone();
        let remote = spans.iter().find(|s| s.parent == route.id)?.clone();
        Some((root, route, remote))
    };
    let mut found = None;
    for _ in 0..100 {
        found = find();
        if found.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (root, route, remote) =
        found.expect("gateway request → route → worker request spans in one trace");
    assert_eq!(
        root.name, remote.name,
        "the worker's span is its request span"
    );
    assert_eq!(
        route.attrs.get("worker").map(String::as_str),
        Some(format!("127.0.0.1:{wport}").as_str())
    );
    assert_eq!(
        remote.attrs.get("x_request_id"),
        root.attrs.get("x_request_id"),
        "the request id travels with the request"
    );
}
