//! Worker choice for the fleet: which worker serves a request soonest (and cheapest).
//!
//! Pure like the rest of the core: the host (the fleet router, or the simulator) passes a
//! snapshot of each candidate's load and the request's prefix block hashes; [`Router`]
//! returns the choice with every candidate's score, so a decision can be explained
//! (`x-tokenfab-worker`, a debug log line). The only state kept here is what a policy
//! needs to remember between requests: the round-robin cursor and, per worker, an LRU
//! estimate of which prefix blocks it holds — built from what the router sent it, since
//! remote servers do not report their caches.

use crate::kv::fnv1a;
use rustc_hash::FxHashMap;
use tokenfab_types::Nanos;

mod prefix_estimate;
use prefix_estimate::PrefixEstimate;

/// Above this many candidates, `prefix-load` scores a sample instead of every worker: the
/// workers last sent the prompt's first block, plus [`SAMPLE`] others drawn from a
/// deterministic sequence (power of d choices, Mitzenmacher). A 1,000-worker fleet then
/// routes in microseconds, and the sampled least-loaded worker is nearly as good as the
/// global one. The published baselines always scan everyone, as they are specified.
pub const FULL_SCAN: usize = 64;
pub const SAMPLE: usize = 16;
/// Workers remembered per first block (the latest ones sent it).
const HOLDERS: usize = 8;

/// How a model's requests are spread over its workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Each eligible worker in turn.
    RoundRobin,
    /// The worker with the fewest outstanding tokens (prompt + remaining output).
    LeastTokens,
    /// tokenfab's policy: predicted TTFT = queue wait + uncached prefill on that worker,
    /// from its estimated prefix overlap and load; the cheapest worker within the SLO, or
    /// the soonest when none is.
    PrefixLoad,
    /// NVIDIA Dynamo's KV router cost (`kv_router` scheduler, default weights):
    /// `prefill_load_scale × uncached prompt blocks + decode blocks`, minimum wins,
    /// with `prefill_load_scale = 1`.
    DynamoKv,
    /// llm-d's inference scheduler default profile: weighted scorers prefix-cache :
    /// queue : kv-cache-utilization = 2 : 2 : 1, each normalised to [0, 1], maximum wins.
    LlmdWeighted,
    /// SGLang router's cache-aware policy: when load is imbalanced (max − min outstanding
    /// requests > 32 and max > 1.5 × min) take the least loaded worker; else the worker
    /// with the longest prefix match if it covers > 50 % of the prompt; else the worker
    /// whose cache is smallest.
    SglangCacheAware,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::RoundRobin,
        Policy::LeastTokens,
        Policy::PrefixLoad,
        Policy::DynamoKv,
        Policy::LlmdWeighted,
        Policy::SglangCacheAware,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastTokens => "least-tokens",
            Policy::PrefixLoad => "prefix-load",
            Policy::DynamoKv => "dynamo-kv",
            Policy::LlmdWeighted => "llmd-weighted",
            Policy::SglangCacheAware => "sglang-cache-aware",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// One candidate's state as the host sees it now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Stable identity (survives re-discovery); keys the prefix estimate.
    pub id: u64,
    /// Requests sent and not yet finished.
    pub outstanding_requests: u32,
    /// Prompt tokens of requests that have not produced a first token yet.
    pub queued_prefill_tokens: u64,
    /// Output tokens still to come, at most, for requests under way.
    pub outstanding_decode_tokens: u64,
    /// KV cache in use, per mille (from the worker's own report; 0 when unknown). Scales
    /// the prefix-load policy's affinity slack: a copy of a prefix on a worker with room
    /// to spare costs nothing, one on a full worker evicts someone else's.
    pub kv_permille: u32,
    /// Prefill cost on this worker's accelerator, ns per prompt token.
    pub prefill_ns_per_token: u64,
    /// Extra step time per running sequence, ns (decodes slow prefill steps down).
    pub decode_ns_per_seq: u64,
    /// Price of the worker, nano-USD per hour (0: free, e.g. the local CPU).
    pub price_nano_usd_per_hour: u64,
}

/// The request being placed.
#[derive(Clone, Debug, Default)]
pub struct RouteRequest<'a> {
    /// Chain hashes of the prompt's blocks (see [`text_block_hashes`]).
    pub blocks: &'a [u64],
    /// Prompt length in tokens (an estimate is fine).
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    /// A session key (hashed): the same session goes to the same worker while it is
    /// eligible.
    pub session: Option<u64>,
    /// Time-to-first-token target.
    pub ttft_slo: Option<Nanos>,
}

/// One candidate's score, for explanations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Score {
    /// Index into the candidates passed to [`Router::route`].
    pub index: usize,
    pub id: u64,
    /// Prompt blocks this worker is estimated to hold already.
    pub cached_blocks: u32,
    /// Prompt tokens it would still have to compute (the prompt's share not covered by
    /// those blocks).
    pub uncached_tokens: u64,
    pub predicted_ttft: Nanos,
    /// The policy's own figure (lower is better), comparable within one decision.
    pub cost: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index into the candidates passed to [`Router::route`].
    pub chosen: usize,
    /// Why: `session`, `policy` or `slo`.
    pub reason: &'static str,
    /// The candidates scored: all of them, or on a large fleet the sample considered.
    pub scores: Vec<Score>,
}

impl Decision {
    /// The chosen candidate's score.
    pub fn chosen_score(&self) -> Option<&Score> {
        self.scores.iter().find(|s| s.index == self.chosen)
    }
}

/// What the router remembers between requests.
#[derive(Debug)]
pub struct Router {
    policy: Policy,
    cursor: u64,
    prefixes: FxHashMap<u64, PrefixEstimate>,
    /// Per first prompt block, the workers last sent it (for sampling large fleets).
    holders: FxHashMap<u64, Vec<u64>>,
    /// Worker id → its index in the last candidate list seen by the sampled path
    /// (checked on use, rebuilt when the list changed).
    positions: FxHashMap<u64, usize>,
    block_capacity: usize,
    block_tokens: u64,
}

impl Router {
    /// `block_capacity`: prefix blocks remembered per worker (oldest forgotten first);
    /// `block_tokens`: tokens one block stands for.
    pub fn new(policy: Policy, block_capacity: usize, block_tokens: u64) -> Router {
        Router {
            policy,
            cursor: 0,
            prefixes: FxHashMap::default(),
            holders: FxHashMap::default(),
            positions: FxHashMap::default(),
            block_capacity: block_capacity.max(1),
            block_tokens: block_tokens.max(1),
        }
    }

    /// Choose among `candidates` (all eligible: healthy, serving the model, of the
    /// tier being tried). `None` only when there are none.
    pub fn route(&mut self, req: &RouteRequest<'_>, candidates: &[WorkerLoad]) -> Option<Decision> {
        let sample = self.sample(req, candidates);
        self.route_within(req, candidates, sample)
    }

    /// The candidates (by position) whose loads a decision on `req` reads: `None` for
    /// all of them; on a large fleet, the sample [`route_within`](Self::route_within)
    /// scores — round-robin's pick, or for prefix-load the workers last sent the
    /// prompt's first block plus [`SAMPLE`] others. It moves the round-robin cursor, so
    /// each call is followed by `route_within` for the same request and candidates.
    /// [`route`](Self::route) does both; the simulator calls the halves, bringing the
    /// sampled workers up to the clock in between (its workers catch up only when read).
    pub fn sample(
        &mut self,
        req: &RouteRequest<'_>,
        candidates: &[WorkerLoad],
    ) -> Option<Vec<usize>> {
        let n = candidates.len();
        if !self.samples(n) || req.session.is_some() {
            return None;
        }
        let start = self.cursor;
        self.cursor = self.cursor.wrapping_add(1);
        if self.policy == Policy::RoundRobin {
            return Some(vec![(start % n as u64) as usize]);
        }
        let mut picked: Vec<usize> = Vec::with_capacity(SAMPLE + HOLDERS);
        if let Some(ids) = req.blocks.first().and_then(|b| self.holders.get(b)) {
            let mut rebuilt = false;
            for id in ids {
                let at = |p: &FxHashMap<u64, usize>| {
                    p.get(id)
                        .copied()
                        .filter(|&i| candidates.get(i).is_some_and(|w| w.id == *id))
                };
                let mut found = at(&self.positions);
                if found.is_none() && !rebuilt {
                    // The list changed since (or the worker left): index it again, once.
                    self.positions = candidates
                        .iter()
                        .enumerate()
                        .map(|(i, w)| (w.id, i))
                        .collect();
                    rebuilt = true;
                    found = at(&self.positions);
                }
                picked.extend(found);
            }
            picked.sort_unstable();
        }
        let mut x = fnv1a(start, b"sample") | 1;
        for _ in 0..SAMPLE {
            // xorshift64: a fixed sequence per decision, so runs repeat exactly.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % n as u64) as usize;
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        Some(picked)
    }

    /// Whether decisions among `candidates` workers score a sample of them (requests
    /// without a session; those with one read every worker).
    pub fn samples(&self, candidates: usize) -> bool {
        candidates > FULL_SCAN && matches!(self.policy, Policy::PrefixLoad | Policy::RoundRobin)
    }

    /// The decision of [`route`](Self::route) among `sample`, what
    /// [`sample`](Self::sample) returned for this request.
    pub fn route_within(
        &mut self,
        req: &RouteRequest<'_>,
        candidates: &[WorkerLoad],
        sample: Option<Vec<usize>>,
    ) -> Option<Decision> {
        if candidates.is_empty() {
            return None;
        }
        // A sample from another candidate list falls back to scoring everyone.
        if let Some(picked) =
            sample.filter(|p| !p.is_empty() && p.iter().all(|&i| i < candidates.len()))
        {
            return Some(self.decide_sampled(req, candidates, picked));
        }
        let mut scores: Vec<Score> = candidates
            .iter()
            .enumerate()
            .map(|(i, w)| self.score(req, i, w))
            .collect();
        if let Some(session) = req.session {
            // Rendezvous hashing: a session keeps its worker while that worker stays
            // eligible, and only its sessions move when it leaves.
            let chosen = (0..candidates.len())
                .max_by_key(|&i| fnv1a(session, &candidates[i].id.to_le_bytes()))?;
            return Some(Decision {
                chosen,
                reason: "session",
                scores,
            });
        }
        let (chosen, reason) = match self.policy {
            Policy::RoundRobin => {
                let i = (self.cursor % candidates.len() as u64) as usize;
                self.cursor = self.cursor.wrapping_add(1);
                (i, "policy")
            }
            Policy::PrefixLoad => {
                pick_within_slo(req, candidates, &scores, self.latest_holder(req))
            }
            Policy::SglangCacheAware => {
                let sizes: Vec<usize> = candidates
                    .iter()
                    .map(|w| self.prefixes.get(&w.id).map_or(0, PrefixEstimate::len))
                    .collect();
                sglang_costs(req, candidates, &mut scores, &sizes);
                (argmin(&scores, |s| s.cost), "policy")
            }
            _ => (argmin(&scores, |s| s.cost), "policy"),
        };
        Some(Decision {
            chosen,
            reason,
            scores,
        })
    }

    /// [`route_within`](Self::route_within) a large fleet's sample: round-robin scores
    /// only its pick; prefix-load chooses within the sample.
    fn decide_sampled(
        &self,
        req: &RouteRequest<'_>,
        candidates: &[WorkerLoad],
        picked: Vec<usize>,
    ) -> Decision {
        if self.policy == Policy::RoundRobin {
            let i = picked[0];
            return Decision {
                chosen: i,
                reason: "policy",
                scores: vec![self.score(req, i, &candidates[i])],
            };
        }
        let sample: Vec<WorkerLoad> = picked.iter().map(|&i| candidates[i].clone()).collect();
        let scores: Vec<Score> = picked
            .iter()
            .map(|&i| self.score(req, i, &candidates[i]))
            .collect();
        // Choose within the sample (by position), then map back to the candidates.
        let (k, reason) = pick_within_slo(req, &sample, &scores, self.latest_holder(req));
        Decision {
            chosen: picked[k],
            reason,
            scores,
        }
    }

    /// The request went to worker `id`: it will hold these blocks.
    pub fn record_sent(&mut self, id: u64, blocks: &[u64]) {
        if let Some(&first) = blocks.first() {
            let ids = self.holders.entry(first).or_default();
            if let Some(k) = ids.iter().position(|&x| x == id) {
                ids.remove(k);
            } else if ids.len() == HOLDERS {
                ids.remove(0);
            }
            ids.push(id);
        }
        let cap = self.block_capacity;
        self.prefixes
            .entry(id)
            .or_insert_with(|| PrefixEstimate::new(cap))
            .touch(blocks);
    }

    /// The worker last sent the prompt's first block.
    fn latest_holder(&self, req: &RouteRequest<'_>) -> Option<u64> {
        let first = req.blocks.first()?;
        self.holders.get(first)?.last().copied()
    }

    /// Forget a worker (it left the fleet, or restarted with an empty cache).
    pub fn forget(&mut self, id: u64) {
        self.prefixes.remove(&id);
    }

    fn score(&self, req: &RouteRequest<'_>, index: usize, w: &WorkerLoad) -> Score {
        let est = self.prefixes.get(&w.id);
        let cached_blocks = est.map_or(0, |p| p.matched(req.blocks));
        // The covered share of the prompt, in whatever unit the host counts it.
        let cached_tokens = match req.blocks.len() as u64 {
            0 => 0,
            n => req.prompt_tokens * u64::from(cached_blocks) / n,
        };
        let uncached = req.prompt_tokens - cached_tokens.min(req.prompt_tokens);
        let predicted_ttft = Nanos(
            (w.queued_prefill_tokens + uncached).saturating_mul(w.prefill_ns_per_token)
                + u64::from(w.outstanding_requests).saturating_mul(w.decode_ns_per_seq),
        );
        let blocks = |t: u64| t.div_ceil(self.block_tokens);
        let cost = match self.policy {
            Policy::RoundRobin | Policy::PrefixLoad => to_i64(predicted_ttft.0),
            Policy::LeastTokens => {
                to_i64(w.queued_prefill_tokens + w.outstanding_decode_tokens + req.prompt_tokens)
            }
            Policy::DynamoKv => to_i64(blocks(uncached) + blocks(w.outstanding_decode_tokens)),
            Policy::LlmdWeighted => {
                // Scores in per mille; negated so that lower is better like the others.
                let prefix = if req.blocks.is_empty() {
                    0
                } else {
                    u64::from(cached_blocks) * 1000 / req.blocks.len() as u64
                };
                let queue = 1000 / (1 + u64::from(w.outstanding_requests));
                let kv = 1000 - u64::from(w.kv_permille.min(1000));
                -to_i64(2 * prefix + 2 * queue + kv)
            }
            Policy::SglangCacheAware => 0, // decided over all candidates below
        };
        Score {
            index,
            id: w.id,
            cached_blocks,
            uncached_tokens: uncached,
            predicted_ttft,
            cost,
        }
    }
}

/// SGLang's cascade compares candidates with each other, so its costs are set here,
/// over all of them at once.
fn sglang_costs(
    req: &RouteRequest<'_>,
    candidates: &[WorkerLoad],
    scores: &mut [Score],
    sizes: &[usize],
) {
    let loads: Vec<u32> = candidates.iter().map(|w| w.outstanding_requests).collect();
    let (min, max) = (
        loads.iter().copied().min().unwrap_or(0),
        loads.iter().copied().max().unwrap_or(0),
    );
    let imbalanced = max - min > 32 && u64::from(max) * 2 > u64::from(min) * 3;
    let best_match = scores.iter().map(|s| s.cached_blocks).max().unwrap_or(0);
    let match_rate_ok =
        !req.blocks.is_empty() && u64::from(best_match) * 2 > req.blocks.len() as u64;
    for (i, s) in scores.iter_mut().enumerate() {
        s.cost = if imbalanced {
            i64::from(loads[i])
        } else if match_rate_ok {
            -i64::from(s.cached_blocks)
        } else {
            to_i64(sizes[i] as u64)
        };
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Index of the lowest `key`; ties go to the earliest candidate.
fn argmin(scores: &[Score], key: impl Fn(&Score) -> i64) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if key(s) < key(&scores[best]) {
            best = i;
        }
    }
    best
}

/// How much later than the soonest worker a worker holding more of the prompt may be
/// predicted to answer and still be preferred: staying with the cache keeps the prefix on
/// one worker (no second copy taking KV elsewhere, later requests hit it too), so
/// near-ties go to the cache instead of splitting a group between workers. The full
/// slack applies when the soonest worker's KV is at least half full (or its use is
/// unknown); below that it shrinks in proportion, since a second copy then evicts
/// nothing — on a fleet with room to spare, concentrating a hot prefix only queues its
/// requests behind each other.
const AFFINITY_SLACK_PCT: u64 = 50;
const AFFINITY_SLACK_NS: u64 = 50_000_000;

/// The share of the affinity slack that applies (per mille) given the KV use of the
/// worker that would take the copy.
fn slack_permille(kv_permille: u32) -> u64 {
    match kv_permille {
        0 => 1000,
        k => (2 * u64::from(k)).min(1000),
    }
}

/// With a TTFT target: among workers predicted to meet it, the cheapest, then the one
/// holding most of the prompt, then the soonest. Otherwise (or when none meets it): among
/// workers predicted within the affinity slack of the soonest, the one holding most of
/// the prompt, then the cheapest, then — when several hold the prompt equally — the
/// one last sent it (`latest`), else the soonest.
///
/// Once a group's prefix has spilled onto a second worker (its holder was briefly too
/// busy), both hold it equally. Taking the soonest of them left the group split for
/// good, each request going to whichever copy was a hair less busy, each copy taking KV.
/// Following the latest holder moves the whole group to where it spilled, which was the
/// least loaded worker at the time, and the copy left behind ages out. (A fixed home per
/// prompt, the rendezvous-hash winner, re-concentrated too, but onto a worker chosen by
/// hash, not load: in the fleet test 8 groups over 3 workers left one worker with 9 of
/// 96 requests.) The slack bounds what the preference may cost per request; with KV to
/// spare that is a few milliseconds. What it costs a hot group, one that needs several
/// workers, is more: 1,000 simulated H100s with 64 hot prefixes (`tokenfab sim
/// --synthetic poisson:2000:100000:1024:128:64:512`) went from TTFT P99 179 to 211 ms
/// (round-robin: 242), P50 unchanged; Mooncake on 16 is unchanged.
fn pick_within_slo(
    req: &RouteRequest<'_>,
    c: &[WorkerLoad],
    s: &[Score],
    latest: Option<u64>,
) -> (usize, &'static str) {
    if let Some(slo) = req.ttft_slo {
        let within = (0..c.len())
            .filter(|&i| s[i].predicted_ttft <= slo)
            .min_by_key(|&i| {
                (
                    c[i].price_nano_usd_per_hour,
                    std::cmp::Reverse(s[i].cached_blocks),
                    s[i].predicted_ttft,
                )
            });
        if let Some(i) = within {
            return (i, "slo");
        }
    }
    let soonest = (0..c.len())
        .min_by_key(|&i| s[i].predicted_ttft)
        .unwrap_or(0);
    let best = s[soonest].predicted_ttft.0;
    let share = slack_permille(c[soonest].kv_permille);
    let limit =
        best + best * AFFINITY_SLACK_PCT * share / 100_000 + AFFINITY_SLACK_NS * share / 1000;
    let chosen = (0..c.len())
        .filter(|&i| s[i].predicted_ttft.0 <= limit)
        .min_by_key(|&i| {
            let followed = s[i].cached_blocks > 0 && latest == Some(c[i].id);
            (
                std::cmp::Reverse(s[i].cached_blocks),
                c[i].price_nano_usd_per_hour,
                !followed,
                s[i].predicted_ttft,
            )
        })
        .unwrap_or(0);
    (chosen, "policy")
}

/// Chain hashes of `text` in blocks of `block_bytes` bytes, salted with `scope` (so equal
/// prompts of different tenants never look shared). The router sees text, not tokens (a
/// remote worker tokenizes), so its blocks are byte blocks; only full blocks are hashed.
pub fn text_block_hashes(scope: &str, text: &[u8], block_bytes: usize) -> Vec<u64> {
    let mut h = fnv1a(crate::kv::FNV_OFFSET, scope.as_bytes());
    h = fnv1a(h, &[0xfe]);
    text.chunks_exact(block_bytes.max(1))
        .map(|b| {
            h = fnv1a(h, b);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: u64) -> WorkerLoad {
        WorkerLoad {
            id,
            prefill_ns_per_token: 100_000,
            decode_ns_per_seq: 1_000_000,
            ..WorkerLoad::default()
        }
    }

    #[test]
    fn round_robin_cycles() {
        let mut r = Router::new(Policy::RoundRobin, 100, 16);
        let ws = [worker(1), worker(2), worker(3)];
        let picks: Vec<usize> = (0..6)
            .map(|_| r.route(&RouteRequest::default(), &ws).map(|d| d.chosen))
            .collect::<Option<_>>()
            .expect("candidates");
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn prefix_load_prefers_the_worker_holding_the_prefix_until_its_queue_costs_more() {
        let mut r = Router::new(Policy::PrefixLoad, 1000, 16);
        let blocks = text_block_hashes("t", &[7u8; 64 * 40], 64);
        r.record_sent(2, &blocks);
        let req = RouteRequest {
            blocks: &blocks,
            prompt_tokens: 640,
            max_tokens: 16,
            ..RouteRequest::default()
        };
        let ws = [worker(1), worker(2)];
        let d = r.route(&req, &ws).expect("decision");
        assert_eq!(d.chosen, 1);
        assert_eq!(d.scores[1].cached_blocks, 40);
        // The holder is now far behind: recomputing elsewhere is sooner.
        let busy = WorkerLoad {
            queued_prefill_tokens: 5_000,
            ..worker(2)
        };
        let d = r.route(&req, &[worker(1), busy]).expect("decision");
        assert_eq!(d.chosen, 0);
    }

    #[test]
    fn a_prefix_held_by_two_workers_follows_the_latest_holder() {
        let mut r = Router::new(Policy::PrefixLoad, 1000, 16);
        let blocks = text_block_hashes("t", &[3u8; 64 * 8], 64);
        r.record_sent(1, &blocks);
        r.record_sent(2, &blocks); // it spilled onto worker 2
        let req = RouteRequest {
            blocks: &blocks,
            prompt_tokens: 128,
            ..RouteRequest::default()
        };
        let busy = |id, q| WorkerLoad {
            queued_prefill_tokens: q,
            ..worker(id)
        };
        // Whichever of the two is a little busier, the group stays where it went last.
        for ws in [[busy(1, 0), busy(2, 100)], [busy(1, 100), busy(2, 0)]] {
            let d = r.route(&req, &ws).expect("decision");
            assert_eq!(d.chosen, 1, "{:?}", d.scores);
        }
        // So too with KV to spare, where the slack is a few milliseconds: 10 tokens
        // (1 ms) of difference either way stays within it.
        let roomy = |id, q| WorkerLoad {
            kv_permille: 50,
            ..busy(id, q)
        };
        for ws in [[roomy(1, 0), roomy(2, 10)], [roomy(1, 10), roomy(2, 0)]] {
            let d = r.route(&req, &ws).expect("decision");
            assert_eq!(d.chosen, 1, "{:?}", d.scores);
        }
        // Past the slack, load wins again; the group then follows that worker.
        let ws = [busy(1, 0), busy(2, 50_000)];
        let d = r.route(&req, &ws).expect("decision");
        assert_eq!(d.chosen, 0);
        r.record_sent(1, &blocks);
        let d = r.route(&req, &[busy(1, 10), busy(2, 0)]).expect("decision");
        assert_eq!(d.chosen, 0, "{:?}", d.scores);
    }

    #[test]
    fn a_large_fleet_is_sampled_and_the_holder_is_still_found() {
        let mut r = Router::new(Policy::PrefixLoad, 1000, 16);
        let ws: Vec<WorkerLoad> = (0..500).map(worker).collect();
        let blocks = text_block_hashes("t", &[9u8; 64 * 20], 64);
        r.record_sent(321, &blocks);
        let req = RouteRequest {
            blocks: &blocks,
            prompt_tokens: 320,
            ..RouteRequest::default()
        };
        let d = r.route(&req, &ws).expect("decision");
        assert_eq!(
            ws[d.chosen].id, 321,
            "the holder is always among those scored"
        );
        assert!(
            d.scores.len() <= SAMPLE + HOLDERS,
            "{} scored",
            d.scores.len()
        );
        assert_eq!(d.chosen_score().map(|s| s.cached_blocks), Some(20));
        // The fleet changed (workers left, so 321 moved): the holder is found at its new
        // place, and one that left is simply not a candidate.
        let fewer: Vec<WorkerLoad> = ws.iter().skip(10).cloned().collect();
        let d = r.route(&req, &fewer).expect("decision");
        assert_eq!(fewer[d.chosen].id, 321);
        let without: Vec<WorkerLoad> = ws.iter().filter(|w| w.id != 321).cloned().collect();
        let d = r.route(&req, &without).expect("decision");
        assert_ne!(without[d.chosen].id, 321);
        // A cold prompt goes to the least loaded of the sample, deterministically.
        let cold = RouteRequest {
            prompt_tokens: 320,
            ..RouteRequest::default()
        };
        let mut a = Router::new(Policy::PrefixLoad, 1000, 16);
        let mut b = Router::new(Policy::PrefixLoad, 1000, 16);
        for _ in 0..10 {
            assert_eq!(a.route(&cold, &ws), b.route(&cold, &ws));
        }
    }

    #[test]
    fn prefix_estimates_are_per_scope() {
        let a = text_block_hashes("tenant-a", b"same prompt, sixteen bytes.....", 16);
        let b = text_block_hashes("tenant-b", b"same prompt, sixteen bytes.....", 16);
        assert_ne!(a, b);
    }

    #[test]
    fn slo_picks_the_cheapest_worker_that_meets_it() {
        let mut r = Router::new(Policy::PrefixLoad, 100, 16);
        let cheap_slow = WorkerLoad {
            price_nano_usd_per_hour: 1,
            queued_prefill_tokens: 1_000, // 100 ms queued
            ..worker(1)
        };
        let dear_fast = WorkerLoad {
            price_nano_usd_per_hour: 9,
            ..worker(2)
        };
        let req = |slo_ms| RouteRequest {
            prompt_tokens: 100,
            ttft_slo: Some(Nanos::from_millis(slo_ms)),
            ..RouteRequest::default()
        };
        let ws = [cheap_slow, dear_fast];
        let d = r.route(&req(500), &ws).expect("decision");
        assert_eq!((d.chosen, d.reason), (0, "slo"));
        let d = r.route(&req(50), &ws).expect("decision");
        assert_eq!((d.chosen, d.reason), (1, "slo"));
        // Nobody meets it: the soonest.
        let d = r.route(&req(5), &ws).expect("decision");
        assert_eq!((d.chosen, d.reason), (1, "policy"));
    }

    #[test]
    fn a_session_stays_on_its_worker_while_it_is_eligible() {
        let mut r = Router::new(Policy::LeastTokens, 100, 16);
        let req = RouteRequest {
            session: Some(42),
            ..RouteRequest::default()
        };
        let all = [worker(1), worker(2), worker(3), worker(4)];
        let first = r.route(&req, &all).expect("decision");
        let id = all[first.chosen].id;
        for _ in 0..5 {
            let d = r.route(&req, &all).expect("decision");
            assert_eq!(all[d.chosen].id, id);
        }
        let rest: Vec<WorkerLoad> = all.iter().filter(|w| w.id != id).cloned().collect();
        let d = r.route(&req, &rest).expect("decision");
        assert_ne!(rest[d.chosen].id, id);
    }

    #[test]
    fn published_baselines_choose_as_documented() {
        let blocks = text_block_hashes("t", &[1u8; 64 * 10], 64);
        let req = RouteRequest {
            blocks: &blocks,
            prompt_tokens: 160,
            ..RouteRequest::default()
        };
        for policy in [
            Policy::DynamoKv,
            Policy::LlmdWeighted,
            Policy::SglangCacheAware,
        ] {
            let mut r = Router::new(policy, 100, 16);
            r.record_sent(2, &blocks);
            let d = r.route(&req, &[worker(1), worker(2)]).expect("decision");
            assert_eq!(d.chosen, 1, "{policy:?} follows the cached prefix");
        }
        // SGLang: imbalance beats the cache.
        let mut r = Router::new(Policy::SglangCacheAware, 100, 16);
        r.record_sent(2, &blocks);
        let hot = WorkerLoad {
            outstanding_requests: 100,
            ..worker(2)
        };
        let d = r.route(&req, &[worker(1), hot]).expect("decision");
        assert_eq!(d.chosen, 0);
    }
}
