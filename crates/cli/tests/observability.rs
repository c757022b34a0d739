//! Observability over a real server (timing-model engine): the metrics catalog in
//! ARCHITECTURE.md matches what `/metrics` exposes, the exposition passes `promtool check
//! metrics` (Debian `prometheus`), and the gateway's LLM series count what happened.

mod common;

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

/// The value of the series `name` whose labels contain every one of `labels`, summed.
fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_catalog_matches_the_exposition_and_promtool_accepts_it() {
    let mut cfg = common::config();
    cfg.model.mock = "linear:1:100".into();
    cfg.gateway.admin_key = ADMIN.into();
    let url = common::serve_mock(cfg).await;
    let (_, key) = common::create_key(&url, ADMIN, json!({"tenant": "obs"})).await;
    let body = |stream: bool| {
        json!({"model": "mock", "max_tokens": 6, "stream": stream,
               "messages": [{"role": "user", "content": "hello"}]})
    };
    for stream in [true, false, true, false] {
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body(stream))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
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
    assert_eq!(completed, 4.0, "{text}");
    let billed = value(
        &text,
        "tokenfab_gateway_tokens_total",
        &["kind=\"completion\""],
    );
    let delivered = value(&text, "tokenfab_engine_delivered_tokens_total", &[]);
    assert_eq!(billed, 24.0);
    assert_eq!(
        billed, delivered,
        "billed completion tokens = engine's delivered"
    );
    assert_eq!(
        value(
            &text,
            "tokenfab_gateway_time_to_first_token_seconds_count",
            &[]
        ),
        4.0
    );
    assert!(value(&text, "tokenfab_gateway_inter_token_seconds_count", &[]) >= 10.0);
    assert_eq!(
        value(&text, "tokenfab_ledger_settle_seconds_count", &[]),
        4.0
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
