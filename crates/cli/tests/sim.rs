//! `tokenfab sim` as users run it: a real trace from ../shared/traces, several policies,
//! the same report twice.

use std::process::Command;

fn sim(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .arg("sim")
        .args(args)
        .output()
        .expect("run tokenfab sim");
    assert!(
        out.status.success(),
        "tokenfab sim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn a_trace_replays_deterministically_and_prefix_routing_beats_round_robin() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/mooncake_synthetic.jsonl"
    );
    if !std::path::Path::new(trace).exists() {
        eprintln!("SKIPPED: no trace at {trace} (../shared/traces is not beside the repository)");
        return;
    }
    let args = [
        "--trace",
        trace,
        "--workers",
        "linear:8:30:200=8",
        "--limit",
        "600",
        "--time-scale",
        "0.08",
        "--length-scale",
        "0.25",
        "--seed",
        "3",
        "--slo-ttft-ms",
        "2000",
        "--compare",
        "round-robin,prefix-load",
        "--json",
    ];
    let a = sim(&args);
    assert_eq!(a, sim(&args), "same trace and seed: byte-identical reports");
    let reports: Vec<serde_json::Value> = a
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let (rr, pl) = (&reports[0], &reports[1]);
    assert_eq!(
        (rr["policy"].as_str(), pl["policy"].as_str()),
        (Some("round-robin"), Some("prefix-load"))
    );
    for r in &reports {
        // Every request ends: served, or refused up front when its TTFT target could not
        // be met (the engine's SLO admission).
        let (done, refused) = (r["completed"].as_u64(), r["rejected"].as_u64());
        assert_eq!(done.zip(refused).map(|(d, x)| d + x), Some(600), "{r}");
    }
    let p99 = |r: &serde_json::Value| r["ttft_ms"]["p99"].as_f64().unwrap_or(f64::MAX);
    assert!(
        p99(pl) < p99(rr),
        "prefix-load {} vs round-robin {}",
        p99(pl),
        p99(rr)
    );
    assert!(pl["prefix_hit_rate"].as_f64() > rr["prefix_hit_rate"].as_f64());
}

#[test]
fn a_synthetic_flood_shows_per_tenant_and_band_and_the_plot_is_drawn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("sim.svg");
    let out = sim(&[
        "--synthetic",
        "poisson:40:400:512:32:8:256,tenants=3,heavy=0.8,batch=0.5",
        "--workers",
        "linear:5:40:100=4",
        "--compare",
        "round-robin,prefix-load",
        "--plot",
        svg.to_str().expect("utf-8 path"),
    ]);
    for want in ["jain work", "batch", "standard", "tenant"] {
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }
    let drawn = std::fs::read_to_string(&svg).expect("plot written");
    assert!(
        drawn.starts_with("<svg"),
        "{}",
        &drawn[..drawn.len().min(80)]
    );
    for want in [
        "TTFT distribution",
        "requests in flight",
        "round-robin",
        "prefix-load",
    ] {
        assert!(drawn.contains(want), "the plot has no {want:?}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args([
            "sim",
            "--synthetic",
            "poisson:1:10:8:8,tenants=0",
            "--workers",
            "instant=1",
        ])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tenants=N"));
    // The fidelity check compares one server with one simulated worker, and says so.
    let two = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args([
            "sim",
            "--synthetic",
            "poisson:1:10:8:8",
            "--workers",
            "instant=2",
        ])
        .args(["--against", "http://127.0.0.1:9"])
        .output()
        .expect("run");
    assert!(!two.status.success());
    assert!(String::from_utf8_lossy(&two.stderr).contains("one simulated worker"));
}
