//! Request traces: the formats in `../shared/traces` (Azure CSV, Mooncake JSONL, ShareGPT
//! JSONL), read into one shape that the simulator and `tokenfab bench --trace` replay.

use std::path::Path;
use tokenfab_types::{Band, Nanos};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRequest {
    /// Arrival, from the trace's first request.
    pub arrival: Nanos,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The prompt as blocks of `block_tokens` tokens, named by id: two requests whose
    /// leading ids are equal share that prefix (empty: unknown, nothing shared).
    pub blocks: Vec<u64>,
    pub block_tokens: u64,
    /// Who sent it (an index; traces without tenants have one, 0) and its band.
    pub tenant: u32,
    pub band: Band,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {0}: {1}")]
    Io(String, std::io::Error),
    #[error("trace {path} line {line}: {why}")]
    Bad {
        path: String,
        line: usize,
        why: String,
    },
    #[error("trace {0} is empty")]
    Empty(String),
}

/// Read a trace, its format told by its content: a CSV header with `ContextTokens`
/// (Azure), JSON lines with `hash_ids` (Mooncake) or `input_toks` (ShareGPT).
pub fn read(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::Io(name.clone(), e))?;
    let bad = |line: usize, why: String| TraceError::Bad {
        path: name.clone(),
        line,
        why,
    };
    let first = text.lines().next().unwrap_or_default();
    let mut reqs = if first.contains("ContextTokens") {
        azure(&text).map_err(|(l, w)| bad(l, w))?
    } else {
        json_lines(&text).map_err(|(l, w)| bad(l, w))?
    };
    if reqs.is_empty() {
        return Err(TraceError::Empty(name));
    }
    reqs.sort_by_key(|r| r.arrival);
    let t0 = reqs[0].arrival;
    for r in &mut reqs {
        r.arrival = Nanos(r.arrival.0 - t0.0);
    }
    Ok(reqs)
}

/// Compress or stretch time (`time_scale` < 1 replays faster) and scale prompt lengths
/// (and their blocks) by `length_scale`, e.g. to fit a small model's context.
pub fn scale(reqs: &mut [TraceRequest], time_scale: f64, length_scale: f64) {
    for r in reqs {
        r.arrival = Nanos((r.arrival.0 as f64 * time_scale) as u64);
        r.input_tokens = ((r.input_tokens as f64 * length_scale).round() as u64).max(1);
        r.block_tokens = ((r.block_tokens as f64 * length_scale).round() as u64).max(1);
    }
}

/// A synthetic trace: `poisson:RATE:COUNT:PROMPT:OUTPUT[:GROUPS:SHARED]` (exponential
/// gaps at RATE requests/s) or `gamma:RATE:CV:COUNT:PROMPT:OUTPUT[:GROUPS:SHARED]` (gamma
/// gaps with coefficient of variation CV: bursts when CV > 1). PROMPT and OUTPUT are
/// token counts; with GROUPS, each request belongs to one of GROUPS prompt groups
/// sharing their first SHARED tokens. The same spec and seed give the same trace.
pub fn synthetic(spec: &str, seed: u64) -> Result<Vec<TraceRequest>, TraceError> {
    use rand::{Rng, SeedableRng};
    use rand_distr::Distribution;
    let bad = |why: &str| TraceError::Bad {
        path: spec.to_owned(),
        line: 0,
        why: why.to_owned(),
    };
    let mut options = spec.split(',');
    let head = options.next().unwrap_or_default();
    // Tenants and bands: `,tenants=N` (uniform), `,heavy=F` (tenant 0 sends a share F of
    // all requests, the others share the rest), `,batch=F` / `,interactive=F` (shares of
    // requests in those bands; the rest standard).
    let (mut tenants, mut heavy, mut batch, mut interactive) = (1u32, 0.0f64, 0.0f64, 0.0f64);
    for o in options {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| bad("options are key=value"))?;
        let share = || {
            v.parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| bad("a share is between 0 and 1"))
        };
        match k {
            "tenants" => {
                tenants = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad("tenants=N, N ≥ 1"))?
            }
            "heavy" => heavy = share()?,
            "batch" => batch = share()?,
            "interactive" => interactive = share()?,
            _ => {
                return Err(bad(
                    "unknown option; use tenants=, heavy=, batch=, interactive=",
                ))
            }
        }
    }
    let parts: Vec<&str> = head.split(':').collect();
    let (kind, nums) = parts.split_first().ok_or_else(|| bad("empty spec"))?;
    let nums: Vec<f64> = nums
        .iter()
        .map(|n| n.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("numbers expected"))?;
    let (rate, cv, rest) = match (*kind, nums.as_slice()) {
        ("poisson", [rate, rest @ ..]) => (*rate, 1.0, rest),
        ("gamma", [rate, cv, rest @ ..]) => (*rate, *cv, rest),
        _ => {
            return Err(bad(
                "use poisson:RATE:COUNT:PROMPT:OUTPUT[:GROUPS:SHARED] or gamma:RATE:CV:...",
            ))
        }
    };
    let (count, prompt, output, groups, shared) = match rest {
        [c, p, o] => (*c, *p, *o, 0.0, 0.0),
        [c, p, o, g, sh] => (*c, *p, *o, *g, *sh),
        _ => return Err(bad("COUNT:PROMPT:OUTPUT[:GROUPS:SHARED] expected")),
    };
    if rate <= 0.0 || cv <= 0.0 {
        return Err(bad("RATE and CV must be positive"));
    }
    let shape = 1.0 / (cv * cv);
    let gaps =
        rand_distr::Gamma::new(shape, 1.0 / (rate * shape)).map_err(|e| bad(&e.to_string()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let block = 16u64;
    let shared_blocks = (shared as u64).min(prompt as u64) / block;
    let mut t = 0.0f64;
    Ok((0..count as u64)
        .map(|_| {
            let blocks = if groups >= 1.0 {
                let g = rng.gen_range(0..groups as u64);
                (0..shared_blocks).map(|b| (g << 32) | b).collect()
            } else {
                Vec::new()
            };
            let tenant = match (tenants, heavy > 0.0) {
                (1, _) => 0,
                (_, true) if rng.gen::<f64>() < heavy => 0,
                (n, true) => rng.gen_range(1..n),
                (n, false) => rng.gen_range(0..n),
            };
            let band = if batch + interactive > 0.0 {
                let x = rng.gen::<f64>();
                if x < interactive {
                    Band::Interactive
                } else if x < interactive + batch {
                    Band::Batch
                } else {
                    Band::Standard
                }
            } else {
                Band::Standard
            };
            let r = TraceRequest {
                arrival: Nanos((t * 1e9) as u64),
                input_tokens: (prompt as u64).max(1),
                output_tokens: (output as u64).max(1),
                blocks,
                block_tokens: block,
                tenant,
                band,
            };
            t += gaps.sample(&mut rng);
            r
        })
        .collect())
}

type LineResult<T> = Result<T, (usize, String)>;

fn azure(text: &str) -> LineResult<Vec<TraceRequest>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let err = |w: &str| (i + 1, w.to_owned());
        let [ts, ctx, gen] = f[..] else {
            return Err(err("expected TIMESTAMP,ContextTokens,GeneratedTokens"));
        };
        let n = |s: &str| s.trim().parse::<u64>().map_err(|_| err("bad token count"));
        out.push(TraceRequest {
            arrival: azure_time(ts).ok_or_else(|| err("bad timestamp"))?,
            input_tokens: n(ctx)?,
            output_tokens: n(gen)?,
            blocks: Vec::new(),
            block_tokens: 16,
            tenant: 0,
            band: Band::Standard,
        });
    }
    Ok(out)
}

/// `2023-11-16 18:15:46.6805900` → time since an arbitrary epoch (days from the date's
/// day of month: traces span hours, not months).
fn azure_time(ts: &str) -> Option<Nanos> {
    let (date, time) = ts.trim().split_once(' ')?;
    let day: u64 = date.rsplit('-').next()?.parse().ok()?;
    let mut hms = time.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    let secs = ((day * 24 + h) * 60 + m) as f64 + 0.0;
    Some(Nanos(((secs * 60.0 + s) * 1e9) as u64))
}

fn json_lines(text: &str) -> LineResult<Vec<TraceRequest>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |w: String| (i + 1, w);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        let num = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| err(format!("missing number `{k}`")))
        };
        if let Some(ids) = v.get("hash_ids").and_then(serde_json::Value::as_array) {
            // Mooncake: ms timestamps, 512-token blocks named by id.
            out.push(TraceRequest {
                arrival: Nanos::from_millis(num("timestamp")?),
                input_tokens: num("input_length")?,
                output_tokens: num("output_length")?,
                blocks: ids.iter().filter_map(serde_json::Value::as_u64).collect(),
                block_tokens: 512,
                tenant: 0,
                band: Band::Standard,
            });
        } else {
            // ShareGPT: ns arrivals and the prompt's token ids, chain-hashed in 16s.
            let ids: Vec<u64> = v
                .get("input_tok_ids")
                .and_then(serde_json::Value::as_array)
                .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_default();
            out.push(TraceRequest {
                arrival: Nanos(num("arrival_time_ns")?),
                input_tokens: num("input_toks")?,
                output_tokens: num("output_toks")?,
                blocks: chain(&ids, 16),
                block_tokens: 16,
                tenant: 0,
                band: Band::Standard,
            });
        }
    }
    spread_buckets(&mut out);
    Ok(out)
}

/// Block ids for token ids: each block's id is a hash of every token up to its end.
fn chain(tokens: &[u64], block: usize) -> Vec<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    tokens
        .chunks_exact(block)
        .map(|b| {
            for t in b {
                for byte in t.to_le_bytes() {
                    h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            h
        })
        .collect()
}

/// Traces that log arrivals in coarse buckets (Mooncake: ~3 s) list many requests at one
/// timestamp: spread each run evenly up to the next distinct timestamp.
fn spread_buckets(reqs: &mut [TraceRequest]) {
    let mut i = 0;
    while i < reqs.len() {
        let t = reqs[i].arrival;
        let j = (i..reqs.len())
            .find(|&k| reqs[k].arrival != t)
            .unwrap_or(reqs.len());
        if j - i > 1 {
            if let Some(next) = reqs.get(j).map(|r| r.arrival) {
                let gap = (next.0 - t.0) / (j - i) as u64;
                for (k, r) in reqs[i..j].iter_mut().enumerate() {
                    r.arrival = Nanos(t.0 + gap * k as u64);
                }
            }
        }
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn reads_the_three_formats() {
        let a = write("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n2023-11-16 18:15:47.0,396,109\n");
        let r = read(a.path()).expect("azure");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].arrival, Nanos::from_millis(500));
        assert_eq!((r[0].input_tokens, r[0].output_tokens), (374, 44));

        let m = write("{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 6, \"hash_ids\": [0, 1]}\n{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 2, \"hash_ids\": [0, 2]}\n{\"timestamp\": 3000, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [9]}\n");
        let r = read(m.path()).expect("mooncake");
        assert_eq!(r[1].arrival, Nanos::from_millis(1500), "bucket spread");
        assert_eq!(r[0].blocks, vec![0, 1]);
        assert_eq!(r[0].block_tokens, 512);

        let s = write("{\"input_toks\": 32, \"output_toks\": 5, \"arrival_time_ns\": 100, \"input_tok_ids\": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32]}\n");
        let r = read(s.path()).expect("sharegpt");
        assert_eq!(r[0].blocks.len(), 2);
        assert_eq!(r[0].arrival, Nanos(0));
    }

    #[test]
    fn synthetic_traces_are_seeded_and_shaped() {
        let a = synthetic("poisson:100:1000:512:32:4:256", 1).expect("spec");
        assert_eq!(
            a,
            synthetic("poisson:100:1000:512:32:4:256", 1).expect("spec")
        );
        assert_ne!(
            a,
            synthetic("poisson:100:1000:512:32:4:256", 2).expect("spec")
        );
        let span = a.last().map_or(0.0, |r| r.arrival.as_secs_f64());
        assert!(
            (8.0..12.0).contains(&span),
            "1000 at 100/s: ~10 s, got {span}"
        );
        assert!(a
            .iter()
            .all(|r| r.blocks.len() == 16 && r.input_tokens == 512));
        let groups: std::collections::BTreeSet<u64> = a.iter().map(|r| r.blocks[0]).collect();
        assert_eq!(groups.len(), 4);
        let bursty = synthetic("gamma:100:3:1000:64:8", 1).expect("spec");
        assert_eq!(bursty.len(), 1000);
        assert!(synthetic("gamma:100:0:10:1:1", 1).is_err());
        assert!(synthetic("uniform:1:2:3:4", 1).is_err());
    }

    #[test]
    fn a_bad_line_is_named() {
        let m = write("{\"timestamp\": 0}\n");
        let e = read(m.path()).expect_err("bad");
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
