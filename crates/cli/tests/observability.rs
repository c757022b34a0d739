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
    .args(["--virtual-time-budget=4000", "--window-size=1280,1000"])
    .args(args)
    .arg(url)
    .kill_on_drop(true);
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
    let mut cfg = common::config();
    cfg.model.mock = "linear:1:100".into();
    cfg.gateway.admin_key = ADMIN.into();
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
    for _ in 0..5 {
        let r = client()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "mock", "max_tokens": 4,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    let after = chromium(&with_key, &["--dump-dom"]).await.expect("dom");
    assert_eq!(shown(&after, "requests-total"), Some(5));
    assert_eq!(shown(&after, "tokens-completion"), Some(20));
    assert!(after.contains(">dash<"), "top tenants lists the tenant");
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
