//! Table of bad inputs: each gets its documented status and OpenAI error envelope; none
//! panics or hangs the server.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: serde_json::Value,
    status: u16,
    code: Option<&'static str>,
) -> Case {
    Case {
        name,
        method: "POST",
        path,
        body: body.to_string().into_bytes(),
        headers: vec![],
        status,
        kind: if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        },
        code,
    }
}

fn chat(extra: serde_json::Value) -> serde_json::Value {
    chat_body("hi", extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_get_clear_errors() {
    let mut cfg = config();
    cfg.server.max_body_bytes = 64 * 1024;
    let url = serve(cfg).await;
    let long_prompt = "ship ".repeat(5000);
    let mut cases = vec![
        Case { body: b"{not json".to_vec(), ..case("malformed json", "/v1/chat/completions", json!({}), 400, Some("invalid_json")) },
        Case { body: Vec::new(), ..case("empty body", "/v1/chat/completions", json!({}), 400, Some("invalid_json")) },
        Case { body: vec![0xff, 0xfe, b'{'], ..case("binary body", "/v1/chat/completions", json!({}), 400, Some("invalid_json")) },
        case("messages wrong type", "/v1/chat/completions", json!({"model": MODEL, "messages": "hi"}), 400, None),
        case("missing model", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}]}), 400, None),
        case("max_tokens wrong type", "/v1/chat/completions", chat(json!({"max_tokens": "ten"})), 400, None),
        case("negative max_tokens", "/v1/chat/completions", chat(json!({"max_tokens": -1})), 400, None),
        case("zero max_tokens", "/v1/chat/completions", chat(json!({"max_tokens": 0})), 400, None),
        case("empty messages", "/v1/chat/completions", json!({"model": MODEL, "messages": []}), 400, None),
        case("unknown role", "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}), 400, None),
        case("image part", "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400, None),
        case("unknown model", "/v1/chat/completions", json!({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}), 404, Some("model_not_found")),
        case("temperature too high", "/v1/chat/completions", chat(json!({"temperature": 5})), 400, None),
        case("top_p zero", "/v1/chat/completions", chat(json!({"top_p": 0})), 400, None),
        case("negative top_k", "/v1/chat/completions", chat(json!({"top_k": -3})), 400, None),
        case("n > 1", "/v1/chat/completions", chat(json!({"n": 3})), 400, None),
        case("five stops", "/v1/chat/completions", chat(json!({"stop": ["a", "b", "c", "d", "e"]})), 400, None),
        case("empty stop", "/v1/chat/completions", chat(json!({"stop": ""})), 400, None),
        case("tools", "/v1/chat/completions", chat(json!({"tools": [{"type": "function"}]})), 400, None),
        case("logprobs", "/v1/chat/completions", chat(json!({"logprobs": true})), 400, None),
        case("context exceeded by prompt", "/v1/chat/completions", chat(json!({})).as_object().map(|_| json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]})).unwrap_or_default(), 400, Some("context_length_exceeded")),
        case("context exceeded by max_tokens", "/v1/chat/completions", chat(json!({"max_tokens": 100000})), 400, Some("context_length_exceeded")),
        case("completion empty prompt", "/v1/completions", json!({"model": MODEL, "prompt": ""}), 400, None),
        case("completion prompt list", "/v1/completions", json!({"model": MODEL, "prompt": ["a", "b"]}), 400, None),
        case("completion echo", "/v1/completions", json!({"model": MODEL, "prompt": "a", "echo": true}), 400, None),
        Case { body: vec![b' '; 100 * 1024], ..case("oversized body", "/v1/chat/completions", json!({}), 413, Some("payload_too_large")) },
        case("unknown route", "/v1/nope", json!({}), 404, Some("not_found")),
        Case { method: "GET", ..case("wrong method", "/v1/chat/completions", json!({}), 405, Some("method_not_allowed")) },
        Case { headers: vec![("x-tokenfab-priority", "urgent")], ..case("bad priority header", "/v1/chat/completions", chat(json!({"max_tokens": 2})), 400, None) },
        Case { headers: vec![("x-request-id", "has spaces in it")], ..case("unusable x-request-id", "/v1/chat/completions", chat(json!({"max_tokens": 2})), 400, None) },
        Case { headers: vec![("x-tokenfab-slo-ttft-ms", "soon")], ..case("SLO not a number", "/v1/chat/completions", chat(json!({"max_tokens": 2})), 400, None) },
        Case { headers: vec![("x-tokenfab-slo-tpot-ms", "0")], ..case("SLO of zero", "/v1/chat/completions", chat(json!({"max_tokens": 2})), 400, None) },
    ];
    let client = client();
    for c in cases.drain(..) {
        let mut req = match c.method {
            "GET" => client.get(format!("{url}{}", c.path)),
            _ => client.post(format!("{url}{}", c.path)).body(c.body.clone()),
        }
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(60));
        for (k, v) in &c.headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: error body is not JSON: {e}", c.name));
        assert_eq!(status, c.status, "{}: {v}", c.name);
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {v}",
            c.name
        );
        assert_eq!(err["type"], c.kind, "{}: {v}", c.name);
        assert!(
            err.get("param").is_some(),
            "{}: envelope lacks param: {v}",
            c.name
        );
        if let Some(code) = c.code {
            assert_eq!(err["code"], code, "{}: {v}", c.name);
        }
    }
    // The server is still healthy and serving after all of that.
    let (status, _) = post(
        &url,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_is_503_with_retry_after() {
    let mut cfg = config();
    cfg.model.slots = 1;
    cfg.scheduler.max_waiting = 1;
    let url = serve(cfg).await;
    let long = |i: u64| {
        chat_body(
            "Write a long story.",
            json!({"max_tokens": 400, "temperature": 0.9, "seed": i, "stream": true}),
        )
    };
    // One running (its first chunk has arrived)...
    let first = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&long(1))
        .send()
        .await
        .expect("first");
    assert_eq!(first.status().as_u16(), 200);
    // ...one waiting (the only slot is taken)...
    let u2 = url.clone();
    let second = tokio::spawn(async move {
        client()
            .post(format!("{u2}/v1/chat/completions"))
            .json(&long(2))
            .send()
            .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health(&url).await["waiting"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "second request never queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...so the third finds the queue full.
    let third = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&long(3))
        .send()
        .await
        .expect("third");
    assert_eq!(third.status().as_u16(), 503);
    let retry = third
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(retry.is_some_and(|s| s >= 1), "Retry-After missing");
    let v: serde_json::Value = third.json().await.expect("json");
    assert_eq!(v["error"]["code"], "overloaded");
    drop(first);
    let second = second.await.expect("join").expect("second");
    assert_eq!(second.status().as_u16(), 200);
}

/// A client that never finishes its request head is disconnected after the header
/// timeout; a head over the size limit gets 431. The server keeps serving others.
#[tokio::test(flavor = "multi_thread")]
async fn slow_and_oversized_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config();
    cfg.server.header_read_timeout_ms = 500;
    cfg.server.max_header_bytes = 16 << 10;
    let url = serve(cfg).await;
    let addr = url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "slow client still connected after 5 s");
    let mut big = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "got: {text:.80}");
    let (status, _) = get_health(&url).await;
    assert_eq!(status, 200, "the server still serves");
}

async fn get_health(url: &str) -> (u16, serde_json::Value) {
    let r = client()
        .get(format!("{url}/health"))
        .send()
        .await
        .expect("send");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}
