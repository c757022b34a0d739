//! End-to-end over HTTP with the real model on llama.cpp: real tokens, streaming,
//! sampling controls, batching, cancellation.

mod common;

use common::*;
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};

fn content(v: &serde_json::Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_generates_real_text_with_usage() {
    let url = serve(config()).await;
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat_body(
            "Write one sentence about the sea.",
            json!({"max_tokens": 24, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let text = content(&v);
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() > 5,
        "not real text: {text:?}"
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap_or(0),
        u["completion_tokens"].as_u64().unwrap_or(0),
    );
    assert!(p > 10, "prompt tokens {p}");
    assert!((1..=24).contains(&c), "completion tokens {c}");
    assert_eq!(u["total_tokens"].as_u64(), Some(p + c));
    assert_eq!(
        u["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(0)
    );
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap_or("");
    assert!(
        reason == "stop" || (reason == "length" && c == 24),
        "{reason} with {c} tokens"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_matches_non_stream_on_an_idle_engine() {
    // Two fresh engines, so neither request is served from the other's prefix cache (a
    // cache hit changes batch shapes, and llama.cpp's numerics with them).
    let (url, url2) = (serve(config()).await, serve(config()).await);
    let body = chat_body(
        "Name three colours.",
        json!({"max_tokens": 20, "temperature": 0}),
    );
    let (_, whole) = post(&url2, "/v1/chat/completions", &body).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = stream_events(&url, "/v1/chat/completions", &sbody).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        content(&whole),
        "streamed text differs from the non-streamed one"
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"].as_array().map(Vec::len), Some(0));
    assert_eq!(usage["usage"], whole["usage"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_stream_and_not() {
    let url = serve(config()).await;
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "temperature": 0});
    let (status, v) = post(&url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!text.is_empty());
    // OpenAI's default max_tokens for completions is 16.
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(99) <= 16);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = stream_events(&url, "/v1/completions", &sbody).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, text);
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_makes_sampling_reproducible_on_an_idle_engine() {
    let url = serve(config()).await;
    let run = |seed: u64| {
        let url = url.clone();
        async move {
            let body = chat_body(
                "Tell me a short story about a fox.",
                json!({"max_tokens": 32, "temperature": 1.0, "top_p": 0.95, "top_k": 40, "seed": seed}),
            );
            let v = post(&url, "/v1/chat/completions", &body).await.1;
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
            (content(&v), cached.unwrap_or(0))
        }
    };
    let (a, cold) = run(7).await;
    let (b, warm) = run(7).await;
    let (c, _) = run(8).await;
    // The repeat is a prefix-cache hit: it computes only the prompt's tail, which the cold
    // run computed as a piece of its own, so the logits are the same bits.
    assert_eq!(
        (cold, warm > 0),
        (0, true),
        "cached tokens {cold}, then {warm}"
    );
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "different seeds should sample differently");
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_strings_cut_the_output() {
    let url = serve(config()).await;
    let body = chat_body(
        "Describe a harbour at dawn.",
        json!({"max_tokens": 40, "temperature": 0}),
    );
    let full = content(&post(&url, "/v1/chat/completions", &body).await.1);
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 6, "need a longer output: {full:?}");
    let stop = words[4].to_owned();
    let expected = &full[..full.find(&stop).expect("stop occurs")];
    let mut sbody = body.clone();
    sbody["stop"] = json!([stop]);
    let (_, v) = post(&url, "/v1/chat/completions", &sbody).await;
    assert_eq!(content(&v), expected);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streaming cuts at the same place.
    sbody["stream"] = json!(true);
    let events = stream_events(&url, "/v1/chat/completions", &sbody).await;
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_completion_tokens_bounds_the_output() {
    let url = serve(config()).await;
    let body = chat_body(
        "Count from one to one hundred in words.",
        json!({"max_completion_tokens": 5, "temperature": 0}),
    );
    let (_, v) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(5), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

/// `ignore_eos` (vLLM's and llama.cpp's extension, for benchmarks): the same greedy
/// request that ends on its own well before `max_tokens` runs to `max_tokens`.
#[tokio::test(flavor = "multi_thread")]
async fn ignore_eos_generates_all_max_tokens() {
    let url = serve(config()).await;
    let ask = |ignore_eos: Option<serde_json::Value>| {
        let mut params = json!({"max_tokens": 48, "temperature": 0});
        if let Some(flag) = ignore_eos {
            params["ignore_eos"] = flag;
        }
        chat_body("Reply with just the word yes.", params)
    };
    let (_, v) = post(&url, "/v1/chat/completions", &ask(None)).await;
    let natural = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(natural < 48, "{v}");
    let (_, v) = post(&url, "/v1/chat/completions", &ask(Some(json!(true)))).await;
    assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(48), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (status, v) = post(&url, "/v1/chat/completions", &ask(Some(json!("yes")))).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_decode_steps() {
    let url = serve(config()).await;
    let steps_before = metric(&url, "tokenfab_engine_step_seconds_count").await;
    let jobs = (0..4).map(|i| {
        let url = url.clone();
        async move {
            let body = chat_body(
                &format!("Write a long poem about the number {i}."),
                json!({"max_tokens": 32, "temperature": 0.8, "seed": i}),
            );
            post(&url, "/v1/chat/completions", &body).await
        }
    });
    let results = futures::future::join_all(jobs).await;
    let mut tokens = 0;
    for (status, v) in &results {
        assert_eq!(*status, 200, "{v}");
        tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    }
    let steps = metric(&url, "tokenfab_engine_step_seconds_count").await - steps_before;
    // Alone, every token costs a step (plus prefill steps). Sharing decode calls, four
    // concurrent sequences need far fewer steps than tokens.
    assert!(
        steps < 0.6 * tokens as f64,
        "{steps} steps for {tokens} tokens: requests did not share batches"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_cancels_and_frees_kv() {
    let url = serve(config()).await;
    let body = chat_body(
        "Write a very long essay about ships.",
        json!({"max_tokens": 1500, "temperature": 0.7, "stream": true}),
    );
    let resp = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    let mut stream = resp.bytes_stream();
    for _ in 0..3 {
        stream.next().await.expect("chunk").expect("bytes");
    }
    let h = health(&url).await;
    assert_eq!(h["running"], 1, "{h}");
    let used_while_running = h["kv_blocks_used"].as_u64().unwrap_or(0);
    assert!(used_while_running > 0);
    drop(stream);
    // A hang guard, not a timing assertion: cancellation takes one step (milliseconds).
    // Afterwards only the prompt's full blocks may remain, as one prefix-cache entry.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(&url).await;
        let used = h["kv_blocks_used"].as_u64().unwrap_or(u64::MAX);
        if h["running"] == 0
            && h["cached_seqs"].as_u64().unwrap_or(9) <= 1
            && used < used_while_running
        {
            break;
        }
        assert!(Instant::now() < deadline, "sequence not cancelled: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let aborted = metric(&url, "vllm:request_success_total{finished_reason=\"abort\"").await;
    assert_eq!(aborted, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn models_health_and_metrics() {
    let url = serve(config()).await;
    let v = get_json(&url, "/v1/models").await;
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(health(&url).await["status"], "ok");
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
    ] {
        metric(&url, name).await;
    }
}
