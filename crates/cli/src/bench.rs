//! `tokenfab bench`: a streaming load generator for any OpenAI-compatible endpoint.
//! Reports TTFT, inter-token and end-to-end latency percentiles, output tokens/s and
//! errors, per request class (`chat`, `long`).

use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenfab_sim::trace::TraceRequest;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Model name to request (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Closed loop: this many requests in flight at once.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests in total.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Words in each user prompt (about one token each).
    #[arg(long, default_value_t = 40)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Words of a system prompt shared within each group (prefix-reuse workload).
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Number of groups sharing a system prompt.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Every 4th request carries a prompt of this many words (class `long`).
    #[arg(long, default_value_t = 0)]
    mix_long: usize,
    /// Extra request header, `name: value` (repeatable), e.g. an API key.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Ask the server to generate exactly `--max-tokens` tokens, past end-of-sequence
    /// (`ignore_eos`, as vLLM and llama.cpp accept it), so throughput compares equal work.
    #[arg(long)]
    ignore_eos: bool,
    /// Replay a request trace (Azure CSV, Mooncake or ShareGPT JSONL) at its own arrival
    /// times instead of generating requests: prompts are built from the trace's prefix
    /// blocks (equal block ids → equal text, so shared prefixes stay shared), one word
    /// per token; `max_tokens` is the trace's output length, at most --max-tokens.
    #[arg(long, conflicts_with_all = ["concurrency", "rate"])]
    trace: Option<std::path::PathBuf>,
    #[command(flatten)]
    replay: crate::sim::Replay,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write every request as the client saw it to FILE, one JSON object per line
    /// in request order: `index`, `class`, `sent_ms` (from the start of the run), then
    /// `ttft_ms`, `e2e_ms`, `tpot_ms`, `max_itl_ms` and the server's token counts, or
    /// `error`. For finding which requests make a tail, and when they were sent.
    #[arg(long, value_name = "FILE")]
    samples: Option<std::path::PathBuf>,
}

const WORDS: &[&str] = &[
    "time", "year", "people", "way", "day", "thing", "world", "school", "state", "family", "group",
    "country", "problem", "hand", "part", "place", "case", "week", "company", "system", "number",
    "night", "point", "home", "water", "room", "money", "story", "month", "book",
];

fn words(n: usize, rng: &mut impl Rng) -> String {
    (0..n)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Default)]
struct Samples {
    ttft: BTreeMap<&'static str, Vec<f64>>,
    itl: BTreeMap<&'static str, Vec<f64>>,
    e2e: Vec<f64>,
    tokens: u64,
    /// Completed without a single content token (the model ended at once): counted as
    /// ok, with no first-token time.
    empty: u64,
    errors: BTreeMap<String, u64>,
    requests: Vec<Measured>,
    /// Requests that failed or produced no content token, for `--samples`.
    others: Vec<Other>,
}

/// A request without a first token: it failed (`error`), or the model ended at once.
#[derive(Serialize)]
struct Other {
    index: usize,
    class: &'static str,
    sent_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    e2e_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One request as the client saw it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Measured {
    /// Position of the request in the trace or job list.
    pub index: usize,
    /// `chat`, `long` or `trace`.
    pub class: &'static str,
    /// When it was sent, from the start of the run.
    pub sent_ms: f64,
    pub ttft_ms: f64,
    pub e2e_ms: f64,
    /// The longest gap between two content pieces.
    pub max_itl_ms: f64,
    /// Mean time per output token after the first.
    pub tpot_ms: f64,
    /// The server's own count (`usage`), when it reported one.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Prompt tokens the server reused from its prefix cache
    /// (`usage.prompt_tokens_details.cached_tokens`), when it reported them.
    pub cached_tokens: Option<u64>,
}

#[derive(Serialize)]
struct Pcts {
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
}

fn pct(xs: &mut [f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let k = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    Some((xs[k.min(xs.len() - 1)] * 100.0).round() / 100.0)
}

fn pcts(xs: &mut [f64]) -> Pcts {
    Pcts {
        p50: pct(xs, 50.0),
        p95: pct(xs, 95.0),
        p99: pct(xs, 99.0),
    }
}

#[derive(Serialize)]
struct Report {
    url: String,
    model: String,
    requests: usize,
    ok: usize,
    /// Of those ok, how many completed with no content token (no TTFT sample).
    empty: u64,
    errors: BTreeMap<String, u64>,
    wall_s: f64,
    out_tok_per_s: f64,
    e2e_ms: Pcts,
    ttft_ms: BTreeMap<&'static str, Pcts>,
    itl_ms: BTreeMap<&'static str, Pcts>,
}

struct Job {
    index: usize,
    body: serde_json::Value,
    tag: &'static str,
    /// Send at this offset from the start (trace replay).
    at: Option<Duration>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// A fresh connection per request, as the peers' neutral client does: reusing idle
/// keep-alive sockets races with servers that close them.
fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .pool_max_idle_per_host(0)
        .build()
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let client = http_client()?;
    let url = args.url.trim_end_matches('/').to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--header must be 'name: value', got '{h}'"))?;
        headers.insert(
            reqwest::header::HeaderName::from_bytes(k.trim().as_bytes())?,
            reqwest::header::HeaderValue::from_str(v.trim())?,
        );
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&client, &url, &headers).await?,
    };
    let jobs = match &args.trace {
        Some(path) => trace_jobs(
            &args.replay.read(path)?,
            args.max_tokens,
            args.temperature,
            &model,
            0,
        ),
        None => make_jobs(&args, &model),
    };
    let requests = jobs.len();
    // Created before any load is sent, so a path that cannot be written fails at once.
    let samples_file =
        match &args.samples {
            Some(path) => Some(std::fs::File::create(path).map_err(|e| {
                anyhow::anyhow!("--samples {}: cannot create it: {e}", path.display())
            })?),
            None => None,
        };
    let drive = Drive {
        client,
        url: url.clone(),
        headers,
        concurrency: args.concurrency,
        rate: args.rate,
        seed: args.seed,
        progress: !args.json,
    };
    let (mut s, wall) = drive.run(jobs).await?;
    if let Some(file) = samples_file {
        write_samples(file, &s)?;
    }
    let report = Report {
        url,
        model,
        requests,
        ok: s.e2e.len(),
        empty: s.empty,
        errors: s.errors.clone(),
        wall_s: (wall * 100.0).round() / 100.0,
        out_tok_per_s: (s.tokens as f64 / wall * 10.0).round() / 10.0,
        e2e_ms: pcts(&mut s.e2e),
        ttft_ms: s.ttft.iter_mut().map(|(k, v)| (*k, pcts(v))).collect(),
        itl_ms: s.itl.iter_mut().map(|(k, v)| (*k, pcts(v))).collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// One JSON line per request, in request order.
fn write_samples(file: std::fs::File, s: &Samples) -> anyhow::Result<()> {
    use std::io::Write;
    let mut rows: Vec<(usize, serde_json::Value)> = Vec::with_capacity(s.requests.len());
    for m in &s.requests {
        rows.push((m.index, serde_json::to_value(m)?));
    }
    for o in &s.others {
        rows.push((o.index, serde_json::to_value(o)?));
    }
    rows.sort_by_key(|(i, _)| *i);
    let mut w = std::io::BufWriter::new(file);
    for (_, row) in rows {
        serde_json::to_writer(&mut w, &row)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// How jobs are sent: over which client, to where, at what pace.
struct Drive {
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
    /// Closed loop with this many in flight; otherwise open loop at `rate` or at the
    /// jobs' own times.
    concurrency: Option<usize>,
    rate: Option<f64>,
    seed: u64,
    progress: bool,
}

impl Drive {
    /// Send every job; what was measured, and the wall time in seconds.
    async fn run(&self, jobs: Vec<Job>) -> anyhow::Result<(Samples, f64)> {
        let pb = ProgressBar::new(jobs.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed}") {
            pb.set_style(style);
        }
        if !self.progress {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let samples = Arc::new(Mutex::new(Samples::default()));
        let t0 = Instant::now();
        // Open loop (a rate or a trace): no cap on requests in flight.
        let open_loop = self.rate.is_some() || jobs.iter().any(|j| j.at.is_some());
        let sem = Arc::new(tokio::sync::Semaphore::new(
            self.concurrency
                .unwrap_or(if open_loop { usize::MAX >> 4 } else { 8 }),
        ));
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ 0x9e37);
        let mut tasks = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some(at) = job.at {
                tokio::time::sleep_until((t0 + at).into()).await;
            } else if let Some(rate) = self.rate {
                let gap = -(1.0 - rng.gen::<f64>()).ln() / rate.max(1e-9);
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
            let permit = sem.clone().acquire_owned().await?;
            let (client, url, headers, samples, pb) = (
                self.client.clone(),
                self.url.clone(),
                self.headers.clone(),
                samples.clone(),
                pb.clone(),
            );
            tasks.push(tokio::spawn(async move {
                one(&client, &url, headers, job, t0, &samples).await;
                pb.inc(1);
                drop(permit);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        pb.finish_and_clear();
        let wall = t0.elapsed().as_secs_f64();
        let s = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        Ok((s, wall))
    }
}

/// Replay `trace` against the server at `url` (its first model) at the trace's own
/// arrival times, output capped at `max_tokens`: each request as the client saw it.
/// Replays with different `salt`s send different text, so a replay finds nothing of an
/// earlier one in the server's prefix cache (shared prefixes within a replay stay
/// shared): repeated replays are equal work, as the simulation of each is.
pub fn replay(
    url: &str,
    trace: &[TraceRequest],
    max_tokens: u32,
    salt: u64,
) -> anyhow::Result<Vec<Measured>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = http_client()?;
        let url = url.trim_end_matches('/').to_owned();
        let headers = reqwest::header::HeaderMap::new();
        let model = first_model(&client, &url, &headers).await?;
        let drive = Drive {
            client,
            url,
            headers,
            concurrency: None,
            rate: None,
            seed: 0,
            progress: true,
        };
        let (s, _) = drive
            .run(trace_jobs(trace, max_tokens, 0.0, &model, salt))
            .await?;
        if !s.errors.is_empty() {
            anyhow::bail!("replay failed for some requests: {:?}", s.errors);
        }
        let mut out = s.requests;
        out.sort_by_key(|m| m.index);
        Ok(out)
    })
}

fn make_jobs(a: &BenchArgs, model: &str) -> Vec<Job> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let system = (a.shared_prefix > 0)
        .then(|| words(a.shared_prefix, &mut rand::rngs::StdRng::seed_from_u64(99)));
    (0..a.requests)
        .map(|i| {
            let mut messages = Vec::new();
            if let Some(sys) = &system {
                let group = i % a.groups.max(1);
                messages.push(serde_json::json!({"role": "system", "content": format!("[group {group}] {sys}")}));
            }
            let long = a.mix_long > 0 && i % 4 == 0;
            let n = if long { a.mix_long } else { a.prompt_tokens };
            messages.push(serde_json::json!({"role": "user", "content": words(n, &mut rng)}));
            let mut body = serde_json::json!({
                "model": model, "messages": messages, "max_tokens": a.max_tokens,
                "temperature": a.temperature, "stream": true,
                "stream_options": {"include_usage": true},
            });
            if a.ignore_eos {
                body["ignore_eos"] = true.into();
            }
            Job {
                index: i,
                body,
                tag: if long { "long" } else { "chat" },
                at: None,
            }
        })
        .collect()
}

/// The requests of a trace, as chat requests at their arrival times; each block's text
/// is drawn from its id and `salt`.
fn trace_jobs(
    reqs: &[TraceRequest],
    max_tokens: u32,
    temperature: f32,
    model: &str,
    salt: u64,
) -> Vec<Job> {
    let block_text = |id: u64, words_in: u64| -> String {
        let seed = id ^ 0x5eed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        words(words_in as usize, &mut rng)
    };
    reqs.iter()
        .enumerate()
        .map(|(i, r)| {
            let mut text = String::new();
            let mut left = r.input_tokens;
            for &id in &r.blocks {
                if left == 0 {
                    break;
                }
                let n = left.min(r.block_tokens);
                text.push_str(&block_text(id, n));
                text.push(' ');
                left -= n;
            }
            if left > 0 {
                // No (more) block ids: this request's own text.
                text.push_str(&block_text(u64::MAX - i as u64, left));
            }
            let max_tokens = r.output_tokens.clamp(1, u64::from(max_tokens));
            Job {
                index: i,
                body: serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": max_tokens, "temperature": temperature, "stream": true,
                    "stream_options": {"include_usage": true},
                }),
                tag: "trace",
                at: Some(Duration::from_nanos(r.arrival.0)),
            }
        })
        .collect()
}

async fn first_model(
    client: &reqwest::Client,
    url: &str,
    headers: &reqwest::header::HeaderMap,
) -> anyhow::Result<String> {
    let v: serde_json::Value = client
        .get(format!("{url}/v1/models"))
        .headers(headers.clone())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{url}/v1/models lists no model; pass --model"))
}

fn record_error(samples: &Mutex<Samples>, job: (usize, &'static str, f64), kind: String) {
    if let Ok(mut s) = samples.lock() {
        *s.errors.entry(kind.clone()).or_insert(0) += 1;
        s.others.push(Other {
            index: job.0,
            class: job.1,
            sent_ms: job.2,
            e2e_ms: None,
            error: Some(kind),
        });
    }
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    headers: reqwest::header::HeaderMap,
    job: Job,
    start: Instant,
    samples: &Mutex<Samples>,
) {
    let t0 = Instant::now();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let who = (job.index, job.tag, ms(t0 - start));
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .headers(headers)
        .json(&job.body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return record_error(samples, who, format!("http {}", r.status().as_u16())),
        Err(e) => return record_error(samples, who, format!("connect: {}", short(&e))),
    };
    let mut stamps: Vec<Instant> = Vec::new();
    let mut usage = (None, None, None);
    let mut buf = Vec::<u8>::new();
    let mut body = resp.bytes_stream();
    let mut done = false;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return record_error(samples, who, format!("stream: {}", short(&e))),
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if v.get("error").is_some() {
                return record_error(samples, who, "error event".into());
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                usage = (
                    u["prompt_tokens"].as_u64(),
                    u["completion_tokens"].as_u64(),
                    u["prompt_tokens_details"]["cached_tokens"].as_u64(),
                );
            }
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !content.is_empty() {
                stamps.push(Instant::now());
            }
        }
    }
    let end = Instant::now();
    if !done {
        return record_error(samples, who, "stream ended without [DONE]".into());
    }
    let Some(first) = stamps.first() else {
        if let Ok(mut s) = samples.lock() {
            s.empty += 1;
            s.e2e.push(ms(end - t0));
            s.others.push(Other {
                index: job.index,
                class: job.tag,
                sent_ms: who.2,
                e2e_ms: Some(ms(end - t0)),
                error: None,
            });
        }
        return;
    };
    if let Ok(mut s) = samples.lock() {
        s.ttft.entry(job.tag).or_default().push(ms(*first - t0));
        s.e2e.push(ms(end - t0));
        let gaps: Vec<f64> = stamps.windows(2).map(|w| ms(w[1] - w[0])).collect();
        let max_itl_ms = gaps.iter().copied().fold(0.0, f64::max);
        s.itl.entry(job.tag).or_default().extend(gaps);
        // Per token, as the server counted them (a streamed piece can carry several, or
        // a token none until its text is complete); else per piece.
        let tokens = usage.1.unwrap_or(stamps.len() as u64);
        s.tokens += tokens;
        let last = stamps.last().copied().unwrap_or(*first);
        s.requests.push(Measured {
            index: job.index,
            class: job.tag,
            sent_ms: who.2,
            ttft_ms: ms(*first - t0),
            e2e_ms: ms(end - t0),
            max_itl_ms,
            tpot_ms: if tokens > 1 {
                ms(last - *first) / (tokens - 1) as f64
            } else {
                0.0
            },
            prompt_tokens: usage.0,
            completion_tokens: usage.1,
            cached_tokens: usage.2,
        });
    }
}

fn short(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "refused".into()
    } else {
        "io".into()
    }
}

fn print_table(r: &Report) {
    let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
    println!("{} ({})", r.url, r.model);
    println!(
        "requests {}  ok {}  errors {}  wall {:.2} s  output {:.1} tok/s",
        r.requests,
        r.ok,
        r.errors.values().sum::<u64>(),
        r.wall_s,
        r.out_tok_per_s
    );
    println!("{:<12} {:>10} {:>10} {:>10}", "ms", "p50", "p95", "p99");
    println!(
        "{:<12} {:>10} {:>10} {:>10}",
        "e2e",
        f(r.e2e_ms.p50),
        f(r.e2e_ms.p95),
        f(r.e2e_ms.p99)
    );
    for (tag, p) in &r.ttft_ms {
        println!(
            "{:<12} {:>10} {:>10} {:>10}",
            format!("ttft {tag}"),
            f(p.p50),
            f(p.p95),
            f(p.p99)
        );
    }
    for (tag, p) in &r.itl_ms {
        println!(
            "{:<12} {:>10} {:>10} {:>10}",
            format!("itl {tag}"),
            f(p.p50),
            f(p.p95),
            f(p.p99)
        );
    }
    if r.empty > 0 {
        println!(
            "ok but empty (the model ended at once, no TTFT sample): {}",
            r.empty
        );
    }
    for (e, n) in &r.errors {
        println!("error: {e} × {n}");
    }
}
