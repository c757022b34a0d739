//! `tokenfab bench` as users run it, against a server over the mock accelerator: the
//! per-request samples it writes, and the errors it records in them.

mod common;

use serde_json::Value;
use std::path::Path;

/// Run `tokenfab bench --url URL ARGS --json`; its exit status, stdout and stderr.
async fn bench(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenfab"));
    cmd.args(["bench", "--url", url, "--json"]).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run tokenfab bench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server over the mock accelerator with step-time profile `profile`: its URL, a
/// scratch directory and a samples path in it.
async fn mock_server(profile: &str) -> (String, tempfile::TempDir, std::path::PathBuf) {
    let mut cfg = common::config();
    cfg.model.mock = profile.into();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("samples.jsonl");
    (common::serve_mock(cfg).await, dir, file)
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("samples file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_hold_every_request_in_order_and_agree_with_the_report() {
    let (url, _dir, file) = mock_server("linear:2:20").await;
    let f = file.display().to_string();
    let (ok, out, err) = bench(
        &url,
        &[
            "--model",
            "mock",
            "--requests",
            "12",
            "--concurrency",
            "3",
            "--max-tokens",
            "6",
            "--mix-long",
            "200",
            "--ignore-eos",
            "--samples",
            &f,
        ],
    )
    .await;
    assert!(ok, "bench failed: {err}");
    let report: Value = serde_json::from_str(out.trim()).expect("report");
    assert_eq!(report["ok"], 12, "{report}");
    let rows = rows(&file);
    let index: Vec<u64> = rows.iter().filter_map(|r| r["index"].as_u64()).collect();
    assert_eq!(
        index,
        (0..12).collect::<Vec<u64>>(),
        "every request, in order"
    );
    for r in &rows {
        let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert!(r.get("error").is_none(), "{r}");
        let class = if (n("index") as u64).is_multiple_of(4) {
            "long"
        } else {
            "chat"
        };
        assert_eq!(r["class"], class, "{r}");
        assert!(n("sent_ms") >= 0.0, "{r}");
        assert!(0.0 < n("ttft_ms") && n("ttft_ms") <= n("e2e_ms"), "{r}");
        assert!(n("max_itl_ms") >= n("tpot_ms"), "{r}");
        assert_eq!(r["completion_tokens"], 6, "{r}");
        assert!(n("prompt_tokens") >= if class == "long" { 200.0 } else { 40.0 });
    }
    // Closed loop of 3: the first three go out at once, the rest as others end.
    let sent = |i: usize| rows[i]["sent_ms"].as_f64().unwrap_or(f64::NAN);
    let first_end = (0..3)
        .map(|i| sent(i) + rows[i]["e2e_ms"].as_f64().unwrap_or(0.0))
        .fold(f64::MAX, f64::min);
    assert!(
        sent(3) + 1.0 >= first_end,
        "the 4th waits for a slot: {rows:?}"
    );
    // The report's percentiles are taken over the same requests.
    let mut chat: Vec<f64> = rows
        .iter()
        .filter(|r| r["class"] == "chat")
        .filter_map(|r| r["ttft_ms"].as_f64())
        .collect();
    chat.sort_by(f64::total_cmp);
    let max = report["ttft_ms"]["chat"]["p99"].as_f64().expect("p99");
    assert!(
        (max - chat[chat.len() - 1]).abs() < 0.01,
        "p99 of 9 is their max: {max} vs {chat:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_rows_with_their_error_and_a_bad_path_fails_before_any_load() {
    let (url, dir, file) = mock_server("linear:1:10").await;
    let f = file.display().to_string();
    let args = [
        "--model",
        "no-such-model",
        "--requests",
        "4",
        "--samples",
        &f,
    ];
    let (ok, out, err) = bench(&url, &args).await;
    assert!(ok, "a run whose requests fail still reports: {err}");
    let report: Value = serde_json::from_str(out.trim()).expect("report");
    assert_eq!(report["errors"]["http 404"], 4, "{report}");
    let rows = rows(&file);
    assert_eq!(rows.len(), 4);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["index"], i, "{r}");
        assert_eq!(r["error"], "http 404", "{r}");
        assert!(r.get("ttft_ms").is_none(), "{r}");
    }

    let missing = dir.path().join("no-such-dir").join("samples.jsonl");
    let m = missing.display().to_string();
    let (ok, _, err) = bench(&url, &["--model", "mock", "--samples", &m]).await;
    assert!(!ok, "an unwritable --samples path fails");
    assert!(
        err.contains("--samples") && err.contains("cannot create"),
        "{err}"
    );
}
