//! Running one request: admit it (limits, budget), then run it on this process's engine or
//! on the fleet worker the router picks — and, while nothing has reached the client, on
//! another worker when that one fails (within the fleet's retry budget).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits::RateInfo;
use crate::meter::{self, Meter};
use crate::output::{Piece, Started, TextOutput};
use crate::state::AppState;
use crate::validate::Spec;
use axum::http::HeaderMap;
use tokenfab_engine::{Band, GenerateRequest, Slo};
use tokenfab_fleet::{Endpoint, Failure, MemberKind, Pick, WorkerError, BLOCK_BYTES};
use tokenfab_ledger::Outcome;
use tokenfab_types::{ErrorCode, TenantId, TokenId, Tokens};
use tracing::Instrument;

/// `max_tokens` reserved and sent for a remote request that names none (a remote worker's
/// context is unknown here; the reservation must bound what it may generate).
pub const REMOTE_DEFAULT_MAX_TOKENS: u64 = 4096;

/// A validated request, ready to run.
pub struct Job {
    pub endpoint: Endpoint,
    /// The model as asked (an alias is resolved here).
    pub model: String,
    /// The prompt as text: the chat template's rendering, or the completion prompt
    /// (routing hashes its blocks).
    pub text: String,
    /// The prompt in the local model's tokens (when this process has a model).
    pub tokens: Option<Vec<TokenId>>,
    /// The request body as received, forwarded to remote workers.
    pub body: serde_json::Value,
    pub spec: Spec,
}

/// Who asks, from the key (or, on a worker, from the gateway's forwarded headers).
struct Who {
    tenant: TenantId,
    weight: u32,
    band: Band,
    cache_scope: Option<String>,
    slo: Slo,
}

/// What stays fixed across attempts.
struct Run<'a> {
    s: &'a AppState,
    job: Job,
    who: Who,
    model: String,
    prompt_tokens: u64,
    max_new: u64,
    blocks: Vec<u64>,
    session: Option<u64>,
    /// Workers tried so far, and why the last one failed.
    tried: Vec<u64>,
    last: Option<WorkerError>,
    forward: Vec<(String, String)>,
}

/// Admit and start `job`; its first piece is read, so that a rejection becomes an HTTP
/// status instead of an error inside a 200 stream.
pub async fn start<'a>(
    s: &'a AppState,
    headers: &HeaderMap,
    caller: &Caller,
    (request_id, x_request_id): (&str, &str),
    job: Job,
) -> Result<(Started, Attempts<'a>), ApiError> {
    let who = who(s, headers, caller)?;
    let local_count = job.tokens.as_ref().map(|t| t.len() as u64);
    let estimate = local_count.unwrap_or(job.text.len() as u64);
    let model = match &s.fleet {
        Some(f) => f
            .resolve(
                &job.model,
                (estimate, job.spec.max_tokens.unwrap_or(u64::MAX)),
                who.band,
            )
            .to_owned(),
        None => job.model.clone(),
    };
    let local = s.engine.as_ref().filter(|_| model == s.model);
    // A remote worker tokenizes with its own model: reserve for the prompt's bytes, an
    // upper bound of any byte-level tokenizer's count; its reported usage is billed.
    let prompt_tokens = match (local, local_count) {
        (Some(_), Some(n)) => n,
        _ => job.text.len() as u64,
    };
    let max_new = job.spec.max_tokens.unwrap_or_else(|| match local {
        Some(e) => e
            .capacity()
            .max_seq_tokens
            .saturating_sub(prompt_tokens)
            .max(1),
        None => REMOTE_DEFAULT_MAX_TOKENS,
    });
    let span = tracing::Span::current();
    span.record("tenant", who.tenant.0.as_str());
    // This node until a fleet worker is chosen.
    span.record("worker", s.config.node.as_str());
    span.record("gen_ai.request.model", model.as_str());
    span.record("gen_ai.request.max_tokens", max_new);
    span.record("gen_ai.response.id", request_id);
    let timer = s.metrics.request(&model, who.band, span.clone());
    let meter = meter::admit(
        s,
        caller.0.as_ref(),
        (request_id, x_request_id),
        timer,
        (&model, prompt_tokens, max_new),
    )
    .instrument(crate::child_span!(&span, "admission"))
    .await?;
    let scope = who.cache_scope.as_deref().unwrap_or(who.tenant.0.as_str());
    let blocks = match &s.fleet {
        Some(_) => tokenfab_fleet::text_block_hashes(scope, job.text.as_bytes(), BLOCK_BYTES),
        None => Vec::new(),
    };
    let session = s.fleet.as_ref().and_then(|f| {
        let v = headers.get(f.spec().session_header.as_str())?;
        // One block covering the whole value: its hash.
        tokenfab_fleet::text_block_hashes("session", v.as_bytes(), v.len().max(1)).pop()
    });
    let mut forward = vec![
        ("x-request-id".to_owned(), x_request_id.to_owned()),
        ("x-tokenfab-tenant".to_owned(), who.tenant.0.clone()),
        ("x-tokenfab-weight".to_owned(), who.weight.to_string()),
        (
            "x-tokenfab-priority".to_owned(),
            who.band.as_str().to_owned(),
        ),
    ];
    if let Some(scope) = &who.cache_scope {
        forward.push(("x-tokenfab-cache-scope".to_owned(), scope.clone()));
    }
    for (h, v) in [(SLO_TTFT, who.slo.ttft), (SLO_TPOT, who.slo.tpot)] {
        if let Some(v) = v {
            forward.push((h.to_owned(), v.as_millis().to_string()));
        }
    }
    let mut attempts = Attempts {
        run: Run {
            s,
            job,
            who,
            model,
            prompt_tokens,
            max_new,
            blocks,
            session,
            tried: Vec::new(),
            last: None,
            forward,
        },
    };
    let started = attempts.attempt(meter).await?;
    Ok((started, attempts))
}

/// A started request's way to run again elsewhere (a non-streaming request whose worker
/// failed mid-way: nothing was sent to the client yet).
pub struct Attempts<'a> {
    run: Run<'a>,
}

impl Attempts<'_> {
    /// The model serving the request (an alias resolved).
    pub fn model(&self) -> &str {
        &self.run.model
    }

    /// Run on the next worker until one produces a first piece, or none is left.
    async fn attempt(&mut self, mut meter: Meter) -> Result<Started, ApiError> {
        let r = &mut self.run;
        let Some(fleet) = r.s.fleet.clone() else {
            let out = match r.local(meter) {
                Ok(out) => out,
                Err(b) => {
                    let (mut m, e) = *b;
                    return Err(fail(&mut m, e).await);
                }
            };
            return first_piece(out, None).await.map_err(|(_, e)| e.error);
        };
        loop {
            let retry = r.last.as_ref().map(|e| match e.failure {
                Failure::Busy => "busy",
                _ => "broken",
            });
            let pick = Pick {
                model: &r.model,
                blocks: &r.blocks,
                prompt_tokens: r.prompt_estimate(),
                max_tokens: r.max_new,
                session: r.session,
                ttft_slo: r.who.slo.ttft,
                exclude: &r.tried,
            };
            let mut lease = match fleet.pick(&pick, retry) {
                Ok(l) => l,
                Err(e) => {
                    // Out of workers (or of retry budget): the last worker's failure
                    // says more than "none left".
                    let err = r.last.take().map_or_else(|| e.into(), ApiError::from);
                    return Err(fail(&mut meter, err).await);
                }
            };
            r.tried.push(lease.member.id);
            let worker = lease.worker().to_owned();
            tracing::Span::current().record("worker", worker.as_str());
            let out = match &lease.member.kind {
                MemberKind::Local => match r.local(meter).map_err(|b| *b) {
                    Ok(out) => out.with_lease(lease),
                    // This engine's queue is full: another worker may have room.
                    Err((m, e)) if e.code == ErrorCode::Overloaded => {
                        let busy = WorkerError {
                            worker,
                            failure: Failure::Busy,
                            status: Some(503),
                            message: e.message,
                        };
                        lease.fail(&busy);
                        r.last = Some(busy);
                        meter = m;
                        continue;
                    }
                    Err((mut m, e)) => return Err(fail(&mut m, e).await),
                },
                MemberKind::Remote(w) => {
                    let mut body = r.job.body.clone();
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("model".into(), r.model.clone().into());
                        obj.insert("max_tokens".into(), r.max_new.into());
                        obj.remove("max_completion_tokens");
                    }
                    // The worker's spans join this request's trace under `route`.
                    let span = crate::child_span!(
                        &tracing::Span::current(),
                        "route",
                        worker = %worker,
                        attempt = r.tried.len()
                    );
                    let mut headers = if w.spec.api_key.is_empty() {
                        r.forward.clone()
                    } else {
                        // A hosted API learns nothing about our tenants.
                        r.forward[..1].to_vec()
                    };
                    headers.extend(crate::trace::outgoing(&span));
                    let stream = r.job.spec.stream;
                    let sent = w.send(r.job.endpoint, body, &headers, stream);
                    match sent.instrument(span).await {
                        Ok(stream) => TextOutput::remote(
                            stream,
                            r.job.spec.stop.clone(),
                            r.prompt_estimate(),
                            meter,
                            r.job.spec.stream,
                        )
                        .with_lease(lease),
                        Err(e) => {
                            lease.fail(&e);
                            drop(lease);
                            if e.failure == Failure::Rejected {
                                return Err(fail(&mut meter, e.into()).await);
                            }
                            tracing::info!(worker, error = %e, "worker failed before the first token; trying another");
                            r.last = Some(e);
                            continue;
                        }
                    }
                }
            };
            match first_piece(out, Some(worker)).await {
                Ok(started) => return Ok(started),
                Err((Some(m), e)) => {
                    meter = m;
                    if let Some(e) = e.retry {
                        r.last = Some(e);
                    }
                }
                Err((None, e)) => return Err(e.error),
            }
        }
    }

    /// Collect a whole (billed) generation: (text, finish_reason, usage, rate limits,
    /// worker). A worker failing mid-way sends the request to another one: nothing has
    /// been sent to the client yet.
    pub async fn collect(mut self, started: Started) -> Result<Collected, ApiError> {
        let Started {
            mut out,
            first,
            mut worker,
        } = started;
        let mut text = String::new();
        let mut piece = Some(first);
        loop {
            match piece {
                Some(Piece::Text(t)) => text.push_str(&t),
                Some(Piece::End {
                    finish_reason,
                    usage,
                }) => {
                    return Ok(Collected {
                        text,
                        finish_reason,
                        usage,
                        rate: out.meter().rate.clone(),
                        worker,
                    })
                }
                Some(Piece::Error(e)) => return Err(e),
                Some(Piece::Retry(e)) => {
                    tracing::info!(worker = e.worker, error = %e, "worker failed mid-generation; running the request elsewhere");
                    self.run.last = Some(e);
                    let started = self.attempt(out.take_meter()).await?;
                    text.clear();
                    out = started.out;
                    worker = started.worker;
                    piece = Some(started.first);
                    continue;
                }
                None => {
                    return Err(ApiError::new(
                        ErrorCode::Internal,
                        "generation ended without a result",
                    ))
                }
            }
            piece = out.next().await;
        }
    }
}

/// A whole response's parts.
pub struct Collected {
    pub text: String,
    pub finish_reason: &'static str,
    pub usage: tokenfab_api::Usage,
    pub rate: Option<RateInfo>,
    pub worker: Option<String>,
}

impl Run<'_> {
    /// The prompt's tokens as well as this process can tell: exact when it runs the same
    /// model, else its bytes at ~4 per token (English BPE). Routing predicts prefill time
    /// from it, and it is billed for a remote request cut short before its worker reported
    /// usage (the reservation holds the bytes, an upper bound).
    fn prompt_estimate(&self) -> u64 {
        if self.s.engine.is_some() && self.model == self.s.model && self.job.tokens.is_some() {
            self.prompt_tokens
        } else {
            self.prompt_tokens.div_ceil(4)
        }
    }

    /// Submit to this process's engine; a refusal hands the meter back unsettled.
    fn local(&self, meter: Meter) -> Result<TextOutput, Box<(Meter, ApiError)>> {
        let (Some(engine), Some(tokens)) = (&self.s.engine, &self.job.tokens) else {
            let e = ApiError::new(
                ErrorCode::Internal,
                "the local engine was chosen but this process has none",
            );
            return Err(Box::new((meter, e)));
        };
        let submitted = engine.submit(GenerateRequest {
            tenant: self.who.tenant.clone(),
            band: self.who.band,
            weight: self.who.weight,
            prompt: tokens.clone(),
            max_new: Tokens(self.max_new),
            seed: self.job.spec.seed,
            sampling: self.job.spec.sampling.clone(),
            slo: self.who.slo,
            cache_scope: self.who.cache_scope.clone(),
        });
        match submitted {
            Ok(generation) => Ok(TextOutput::engine(
                generation,
                self.s.tokenizer.clone(),
                self.job.spec.stop.clone(),
                self.prompt_tokens,
                meter,
                self.job.spec.stream,
            )),
            Err(e) => Err(Box::new((meter, e.into()))),
        }
    }
}

/// Why an attempt ended before its first piece.
struct Stopped {
    error: ApiError,
    /// Set when another worker may take the request.
    retry: Option<WorkerError>,
}

/// Read the first (billed) piece. A worker failure before it hands the meter back (with
/// the failure) so the request can run elsewhere.
async fn first_piece(
    mut out: TextOutput,
    worker: Option<String>,
) -> Result<Started, (Option<Meter>, Stopped)> {
    match out.next().await {
        Some(Piece::Retry(e)) => Err((
            Some(out.take_meter()),
            Stopped {
                error: ApiError::from(e.clone()),
                retry: Some(e),
            },
        )),
        Some(Piece::Error(error)) => Err((None, Stopped { error, retry: None })),
        Some(first) => Ok(Started { out, first, worker }),
        None => Err((
            None,
            Stopped {
                error: ApiError::new(ErrorCode::Internal, "empty generation"),
                retry: None,
            },
        )),
    }
}

/// End a request that failed after admission: bill what was served, return the error
/// (or the ledger's, if settling failed).
pub async fn fail(meter: &mut Meter, e: ApiError) -> ApiError {
    let served = meter.usage();
    match meter.finish(served, Outcome::Failed).await {
        Ok(()) => e,
        Err(le) => le,
    }
}

const SLO_TTFT: &str = "x-tokenfab-slo-ttft-ms";
const SLO_TPOT: &str = "x-tokenfab-slo-tpot-ms";

/// `x-tokenfab-slo-ttft-ms` / `-tpot-ms`: the request's latency targets. A TTFT target the
/// engine predicts it cannot meet is refused at once (503 with `Retry-After`), and the
/// router prefers the cheapest worker predicted to meet it.
fn slo(headers: &HeaderMap) -> Result<Slo, ApiError> {
    let ms = |name: &str| -> Result<Option<tokenfab_types::Nanos>, ApiError> {
        let Some(v) = headers.get(name) else {
            return Ok(None);
        };
        v.to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| (1..=3_600_000).contains(ms))
            .map(|ms| Some(tokenfab_types::Nanos::from_millis(ms)))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("{name} must be a whole number of milliseconds in 1..=3600000"),
                )
            })
    };
    Ok(Slo {
        ttft: ms(SLO_TTFT)?,
        tpot: ms(SLO_TPOT)?,
    })
}

fn who(s: &AppState, headers: &HeaderMap, caller: &Caller) -> Result<Who, ApiError> {
    let band = band(headers, caller)?;
    let cache_scope = cache_scope(headers)?;
    let slo = slo(headers)?;
    let (tenant, weight) = match &caller.0 {
        Some(k) => (k.tenant.clone(), k.weight),
        None if s.config.trust_forwarded_tenant => forwarded_tenant(headers)?,
        None => (TenantId::local(), 1),
    };
    Ok(Who {
        tenant,
        weight,
        band,
        cache_scope,
        slo,
    })
}

/// On a worker: the tenant and weight the gateway in front authenticated.
fn forwarded_tenant(headers: &HeaderMap) -> Result<(TenantId, u32), ApiError> {
    let tenant = match headers.get("x-tokenfab-tenant").map(|v| v.to_str()) {
        None => TenantId::local(),
        Some(Ok(t)) if (1..=128).contains(&t.len()) => TenantId(t.to_owned()),
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "x-tokenfab-tenant must be 1-128 visible characters",
            ))
        }
    };
    let weight = match headers.get("x-tokenfab-weight").map(|v| v.to_str()) {
        None => 1,
        Some(Ok(w)) => w
            .parse::<u32>()
            .ok()
            .filter(|w| (1..=10_000).contains(w))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    "x-tokenfab-weight must be an integer in 1..=10000",
                )
            })?,
        Some(Err(_)) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "x-tokenfab-weight must be an integer in 1..=10000",
            ))
        }
    };
    Ok((tenant, weight))
}

/// The band a request runs in: the `x-tokenfab-priority` header, else the key's default.
/// A header may lower a key's priority, never raise it.
fn band(headers: &HeaderMap, caller: &Caller) -> Result<Band, ApiError> {
    let default = caller.0.as_ref().map_or(Band::Standard, |k| k.priority);
    let Some(v) = headers.get("x-tokenfab-priority") else {
        return Ok(default);
    };
    let asked = v.to_str().ok().and_then(Band::parse).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "x-tokenfab-priority must be one of: interactive, standard, batch",
        )
    })?;
    if caller.0.is_some() && asked < default {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!(
                "This key may use priority `{}` at most; `{}` was asked.",
                default.as_str(),
                asked.as_str()
            ),
        ));
    }
    Ok(asked)
}

/// `x-tokenfab-cache-scope: NAME` opts into a prefix cache shared by every tenant that
/// names the same scope; without it, cached prefixes stay private to the tenant.
fn cache_scope(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("x-tokenfab-cache-scope") else {
        return Ok(None);
    };
    let ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match v.to_str() {
        Ok(s) if ok(s) => Ok(Some(s.to_owned())),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "x-tokenfab-cache-scope must be 1-64 characters of [A-Za-z0-9._-]",
        )),
    }
}
