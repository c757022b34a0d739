//! The step planner: one token budget per step; decodes of running sequences first,
//! then prefill chunks of partially prefilled ones, then new sequences from the queue
//! (reusing cached prefixes). Preempts by recomputation when KV runs out.

use crate::budget::StepBudget;
use crate::kv::BlockId;
use crate::queue::Waiting;
use crate::request::Band;
use crate::scheduler::{Running, Scheduler};
use crate::step::{PrefixCopy, StepPlan, Work};
use tokenfab_types::{Nanos, RequestId, SeqSlot, Tokens};

/// How many target step times a step may take when no sequence decodes. Nobody waits on
/// it but requests arriving meanwhile; chunks twice as long lose less to the per-step
/// cost (a 3,000-token prompt prefills ~12 % faster in 256-token chunks than in 64).
const IDLE_STEP_FACTOR: u64 = 2;

/// The share of the prefill time a step gets while its prompts belong to a tenant served
/// more than another active one.
const CONTENDED_STEP_SHARE: f64 = 0.5;

/// How many target step times a step may take at most to start short prompts into a
/// decode batch that has room for them (see `fill_stretch`).
const MAX_FILL_STRETCH: f64 = 4.0;

impl Scheduler {
    /// Whether a running sequence is still prefilling block `index` of hash `hash`.
    /// Chain hashes fix a block's position (each folds in every block before it), so
    /// only the same index of each running prompt can match: a scan of the batch, where
    /// a set of every in-flight block cost a rebuild of up to batch × prompt blocks per
    /// step (64 × ~1,000 on Mooncake prompts; most of a saturated simulation's time).
    fn prefilling(&self, index: usize, hash: u64) -> bool {
        let bt = u64::from(self.blocks.block_tokens());
        self.running.iter().any(|r| {
            (r.computed / bt) as usize <= index && r.req.block_hashes.get(index) == Some(&hash)
        })
    }

    /// A free slot (when `slot`) and `blocks` free blocks for `requester`, evicting cache
    /// entries not in `keep`. Floors guarantee blocks, not executor slots: when only
    /// entries of tenants at their floor hold slots, one of them gives its slot up.
    fn make_room(&mut self, blocks: u32, keep: &[SeqSlot], requester: u32, slot: bool) -> bool {
        if slot
            && self.free_slots.is_empty()
            && !self.evict_one(keep, Some(requester))
            && !self.evict_one(keep, None)
        {
            return false;
        }
        self.ensure_free(blocks, keep, requester)
    }

    /// Room to start a sequence of `known` tokens, `reused` of them from the cache: a slot
    /// (when `slot`: not for one taking a cache entry's over), and blocks for the uncached
    /// part under the tenant's cap and in the pool — on top of what running sequences
    /// still need for theirs. Admitting on the first chunk alone
    /// lets several long prompts start, run the pool dry and preempt each other into
    /// endless recomputation.
    fn room_for(
        &mut self,
        owner: u32,
        known: u64,
        reused: u64,
        keep: &[SeqSlot],
        slot: bool,
    ) -> bool {
        let own = self.blocks.blocks_for(known) - self.blocks.blocks_for(reused);
        let outstanding: u32 = self
            .running
            .iter()
            .map(|r| {
                self.blocks
                    .blocks_for(r.known)
                    .saturating_sub(r.blocks.len() as u32)
            })
            .sum();
        let need = own + self.cfg.watermark_blocks + outstanding;
        self.cap_room(owner, own, keep) && self.make_room(need, keep, owner, slot)
    }

    /// Grow a running sequence's block table to hold `tokens` tokens, within its tenant's
    /// cap, evicting cache entries (never those in `pinned`) when the pool is short.
    fn reserve(&mut self, i: usize, tokens: u64, pinned: &[SeqSlot]) -> bool {
        let need = self.blocks.blocks_for(tokens) as usize;
        let missing = need.saturating_sub(self.running[i].blocks.len()) as u32;
        let (slot, owner) = (self.running[i].slot, self.running[i].owner);
        if !self.cap_room(owner, missing, pinned) {
            return false;
        }
        self.ensure_free(missing, pinned, owner);
        while self.running[i].blocks.len() < need {
            match self.blocks.allocate(slot, owner) {
                Some(b) => self.running[i].blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// The running sequence to preempt first so that `requester` can grow: its own when
    /// it is at its cap, else any not protected by a floor from it; among those the
    /// lowest band, then the highest fairness counter, then the most recent arrival.
    fn victim(&self, requester: Option<u32>) -> Option<usize> {
        let own_only = requester.is_some_and(|o| self.cap_headroom(o) == 0);
        (0..self.running.len())
            .filter(|&i| {
                let o = self.running[i].owner;
                if own_only {
                    Some(o) == requester
                } else {
                    !self.protected(o, requester)
                }
            })
            .max_by_key(|&i| {
                let r = &self.running[i];
                (r.req.band, self.fair.counter(r.owner), r.req.arrival)
            })
    }

    /// Preempt by recomputation: free the sequence's KV and requeue it with what it has
    /// generated so far, to be prefilled again.
    pub(crate) fn preempt(&mut self, i: usize) {
        let r = self.running.swap_remove(i);
        self.free_running(&r);
        self.stats.preemptions += 1;
        self.queue.push(r.req, r.owner, Tokens(r.generated), 0);
    }

    /// Plan the next step.
    pub fn plan(&mut self, now: Nanos) -> StepPlan {
        debug_assert!(self.inflight.is_empty(), "plan while a step is in flight");
        self.now = self.now.max(now);
        self.preempt_for_fair_share();
        let mut work: Vec<Work> = Vec::new();
        for r in &mut self.running {
            r.planned = false;
        }

        // 1. Decodes, in admission order; not those held until a quiet tenant's request
        //    has its first token (`quiet_start`).
        let quiet = self.quiet_start();
        self.plan_decodes(&mut work, quiet.as_ref().map_or(&[], |q| &q.held), true);

        // Give prefill the time the measured step times leave within the target step:
        // streams decoding get their next token on time, and with nothing decoding, a
        // request arriving mid-step waits at most IDLE_STEP_FACTOR targets for it.
        // Until the model has seen enough steps, the token budget alone limits prefill.
        let decodes = work.len();
        let repay = std::mem::take(&mut self.raised_piece) && decodes > 0;
        let mut budget = StepBudget {
            tokens: self.tokens_left(&work),
            secs: None,
            floor: 0,
        };
        // 2–5: prefill. When several tenants have prompts to compute, only the lead's
        // requests start in this step (see `prefill_lead`); if that leaves the step with
        // no prefill at all, the others start rather than leave it empty. A quiet start's
        // tenant leads its steps whatever its counter: once its first prompt is charged
        // it may no longer be the least served, and the step computing that prompt's
        // tail then started the flood's new requests beside it (their prompts made the
        // step 530 ms instead of ~25: `scripts/bench-noisy`, B's TTFT ~1 s).
        let mut adm = Admission {
            lead: match &quiet {
                Some(q) => Some(Lead {
                    owner: q.owner,
                    band: q.band,
                    counter: 0,
                }),
                None => self.prefill_lead(),
            },
            held: quiet.as_ref().map(|q| q.held.clone()).unwrap_or_default(),
            ..Admission::default()
        };
        // The step's prompts go to a tenant while a less-served one is active (decoding,
        // or between requests): keep the step short, so that the quieter tenant's next
        // request, which can only start once the step in progress ends, waits less.
        let contended = matches!(
            (adm.lead, self.active_min_counter()),
            (Some(lead), Some(least)) if lead.counter > least
        );
        // Prompts down to their last block get their first token from this step: clients
        // wait on it as on a decode. (Timed as idle, the step that computed chats' tails
        // beside a 3,000-token prompt took a 0.5 s piece of it: mixlong chats' TTFT.)
        let bt = u64::from(self.blocks.block_tokens());
        let tails = (self.running.iter())
            .filter(|r| !r.planned && (2..=bt).contains(&r.remaining_prefill()))
            .count();
        let waited_on = decodes + tails;
        if let Some(target) = self.cfg.target_step {
            let target = if waited_on == 0 {
                Nanos(target.0 * IDLE_STEP_FACTOR)
            } else if contended {
                target
            } else {
                Nanos((target.0 as f64 * self.fill_stretch(waited_on)) as u64)
            };
            let share = if contended { CONTENDED_STEP_SHARE } else { 1.0 };
            budget.secs = Some(self.times.prefill_secs(decodes, target) * share);
            // One block, or one piece of the kernels' fast path if that is more, whatever
            // the time says: a prompt deep enough that not even that fits in the time
            // left still moves. Not in the step right after one that took such a piece
            // beside decoding streams: they get a token between two (a piece deep in a
            // 3,000-token prompt made each step ~0.45 s against a 0.25 s target, and a
            // token whose text completes only with the next reached the client two of
            // them later: `scripts/bench-peers`' mixlong chats, ITL P99 0.94 s). Prompts
            // lose a decode-only step's ~35 ms per piece.
            if !repay {
                budget.floor =
                    u64::from(self.blocks.block_tokens().max(self.cfg.min_prefill_piece));
            }
        }
        self.plan_prefill(&mut budget, &mut work, &mut adm);
        if adm.deferred.get() && adm.start.is_empty() && work.iter().all(Work::is_decode) {
            adm.lead = None;
            self.plan_prefill(&mut budget, &mut work, &mut adm);
        }
        // The quiet tenant's request got no work after all (it could not start, or its
        // next piece found no room): the held work runs.
        if let Some(q) = &quiet {
            if let Some(r) = self
                .running
                .iter_mut()
                .find(|r| r.req.id == q.id && r.planned)
            {
                if q.waiting {
                    r.quiet_until = r.known;
                    self.stats.quiet_starts += 1;
                }
            } else {
                adm.held.clear();
                adm.lead = self.prefill_lead();
                self.plan_decodes(&mut work, &[], false);
                budget.tokens = self.tokens_left(&work);
                self.plan_prefill(&mut budget, &mut work, &mut adm);
            }
        }

        // Sequences hold blocks but none can advance (all prefilling, pool exhausted):
        // preempt one so the others make progress, and plan again.
        if work.is_empty() && !self.running.is_empty() && adm.start.is_empty() {
            if let Some(v) = self.victim(None) {
                self.preempt(v);
                return self.plan(now);
            }
        }

        self.inflight.clone_from(&work);
        if !work.is_empty() {
            self.stats.steps += 1;
        }
        let mut plan = self.owed();
        plan.start = adm.start;
        plan.copies = adm.copies;
        plan.work = work;
        plan
    }

    /// Pass 1 of [`plan`](Self::plan): the next token of every running sequence whose
    /// prompt is computed, but those in `held` (sorted). When KV runs out: evict cache
    /// entries, then, if `preempt` (before any sequence starts in this step), preempt
    /// the victim; else the sequence waits for a later step.
    fn plan_decodes(&mut self, work: &mut Vec<Work>, held: &[RequestId], preempt: bool) {
        let mut budget = self.tokens_left(work);
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            if r.planned
                || !r.decodes_next()
                || budget == 0
                || held.binary_search(&r.req.id).is_ok()
            {
                i += 1;
                continue;
            }
            let tokens = r.computed + 1;
            if self.reserve(i, tokens, &[]) {
                let r = &mut self.running[i];
                r.planned = true;
                work.push(Work {
                    id: r.req.id,
                    slot: r.slot,
                    pos: r.computed,
                    n: 1,
                    sample: true,
                });
                budget -= 1;
                i += 1;
                continue;
            }
            let victim = preempt.then(|| self.victim(Some(self.running[i].owner)));
            let Some(v) = victim.flatten() else {
                // Nothing this sequence may displace: it waits for a later step.
                i += 1;
                continue;
            };
            let victim_id = self.running[v].req.id;
            work.retain(|w| w.id != victim_id);
            self.preempt(v);
            // Indices shifted (swap_remove): restart the walk; planned ones are skipped.
            budget = self.tokens_left(work);
            i = 0;
        }
    }

    /// The step's token budget less what `work` already takes.
    fn tokens_left(&self, work: &[Work]) -> u64 {
        let used: u64 = work.iter().map(|w| u64::from(w.n)).sum();
        u64::from(self.cfg.max_step_tokens).saturating_sub(used)
    }

    /// How many target step times a step with `decodes` streams waiting on it (decoding,
    /// or at their prompt's tail) may take, so that short waiting prompts (at most one
    /// chunk long) join the decode batch in one step rather than one per step:
    /// `(decodes + short waiting prompts the batch has room for) / decodes`, at most
    /// [`MAX_FILL_STRETCH`]. A step reads all the weights once whatever it holds, so
    /// while the batch decodes fewer streams than it could, every step runs below the
    /// kernels' throughput: in a closed loop of 16 clients whose requests end together,
    /// starting their successors one per step cost ~10 % of output tokens/s (`tokenfab
    /// bench --concurrency 16 --ignore-eos`). The decoding streams pay one longer gap
    /// between tokens, once per such wave. Long prompts do not count, so a 3,000-token
    /// prompt's chunks still keep to the target beside chats, and neither do started
    /// prompts (counting them doubled the shared-prefix TTFT P50).
    fn fill_stretch(&self, decodes: usize) -> f64 {
        let short = u64::from(self.cfg.max_prefill_chunk);
        let room = (self.cfg.max_running as usize).saturating_sub(self.running.len());
        let waiting = (self.queue.iter().take(4 * room))
            .filter(|w| w.req.prompt.0 + w.generated.0 <= short)
            .count()
            .min(room);
        ((decodes + waiting) as f64 / decodes.max(1) as f64).min(MAX_FILL_STRETCH)
    }

    /// Passes 2–5 of [`plan`](Self::plan): new sequences and prefill chunks.
    fn plan_prefill(&mut self, budget: &mut StepBudget, work: &mut Vec<Work>, adm: &mut Admission) {
        // 2. New sequences whose whole (uncached) prompt fits the budget: short requests
        //    get their first token without waiting behind a long prefill.
        //    (Letting this pass stretch the step to 1.5× the target, so that a prompt a
        //    little too long gets its first token a step sooner, doubled the shared-prefix
        //    load's TTFT P50: 1.15 s → 1.7–2.6 s, the warm requests waiting on longer
        //    steps.)
        self.admit_from_queue(budget, work, adm, Pass::Whole);

        // 3. New sequences with less prompt to go than the longest running prefill, and
        //    at most a chunk, chunked, in half of what is left: a chat that does not fit
        //    one step still starts before a 3,000-token prompt's next chunk, and that
        //    prompt keeps the other half. (A long prompt waits for pass 5: it would not
        //    get its first token soon anyway.)
        let longest = (self.running.iter())
            .filter(|r| !r.planned && r.remaining_prefill() > 0)
            .map(Running::remaining_prefill)
            .max();
        let short = u64::from(self.cfg.max_prefill_chunk);
        if let Some(m) = longest {
            let mut half = budget.half();
            let before = half;
            let pass = Pass::ShorterThan(m.min(short + 1));
            self.admit_from_queue(&mut half, work, adm, pass);
            budget.spend(before, half);
        }

        // 4. Prefill chunks of running sequences: those with at most a chunk to go first,
        //    least left first (a chat's last chunk is not held behind a long prompt's
        //    next one), then longer ones oldest first. Least-left-first among long prompts
        //    too starved one: each newer, slightly shorter 3,000-token prompt went ahead
        //    of it while it waited with ~3,000 to go (mixlong: a TTFT of 122 s, in a
        //    147 s run).
        let mut order: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                !r.planned && r.remaining_prefill() > 0 && !adm.holds(r.req.id)
            })
            .collect();
        order.sort_by_key(|&i| {
            let r = &self.running[i];
            match r.remaining_prefill() {
                left if left <= short => (false, left),
                _ => (true, r.req.arrival.0),
            }
        });
        for i in order {
            if !budget.open() {
                break;
            }
            if let Some(w) = self.prefill_chunk(i, budget, &adm.pinned) {
                work.push(w);
            }
        }

        // 5. Further new sequences, chunked, while budget, places, slots and blocks remain.
        self.admit_from_queue(budget, work, adm, Pass::Any);
    }

    /// The tenant whose new sequences this step starts when several tenants have
    /// prompts waiting or part-computed: the most urgent band, then the least served (VTC
    /// counter) — the queue's own order, applied to the step. Other tenants' requests
    /// start in a later step; their decodes and the chunks of prompts already started
    /// still run (holding those back let a started prompt be preempted before it ever
    /// finished, over and over — the property test found the livelock). A quiet tenant's
    /// first token then shares its step with no flood's new prompts: on 2 CPU cores a
    /// step carrying those as well took 2–3× as long. Prefill is compute-bound, so
    /// putting different tenants' prompts in separate steps costs little throughput.
    fn prefill_lead(&self) -> Option<Lead> {
        if self.fair.tenants() < 2 {
            return None;
        }
        let key = |owner: u32, band: Band| Lead {
            owner,
            band,
            counter: self.fair.counter(owner),
        };
        let queued = self
            .queue
            .peek(&self.fair)
            .map(|w| key(w.owner, w.req.band));
        let running = (self.running.iter())
            .filter(|r| !r.planned && r.remaining_prefill() > 0)
            .map(|r| key(r.owner, r.req.band));
        queued
            .into_iter()
            .chain(running)
            .min_by_key(|l| (l.band, l.counter))
    }

    /// [`defers`](Self::defers) without noting it.
    fn would_defer(&self, adm: &Admission, owner: u32, band: Band) -> bool {
        adm.lead.is_some_and(|l| {
            l.owner != owner && (band, self.fair.counter(owner)) > (l.band, l.counter)
        })
    }

    /// Whether `owner`'s request (in `band`) waits for the lead's to start first.
    fn defers(&self, adm: &Admission, owner: u32, band: Band) -> bool {
        let d = self.would_defer(adm, owner, band);
        if d {
            adm.deferred.set(true);
        }
        d
    }

    /// Move requests from the queue into the running batch, in policy order, sharing
    /// cached prefixes, as far as `pass` allows.
    fn admit_from_queue(
        &mut self,
        budget: &mut StepBudget,
        work: &mut Vec<Work>,
        adm: &mut Admission,
        pass: Pass,
    ) {
        let bt64 = u64::from(self.blocks.block_tokens());
        while budget.open() && (self.running.len() as u32) < self.cfg.max_running {
            // A request whose next uncached block is being computed right now by a running
            // sequence waits a few steps and reuses it, instead of computing it twice.
            // A request of a tenant whose running sequences leave no room under its cap for
            // this prompt waits for them, without holding up other tenants.
            // In the passes for short prompts, a prompt too long for the pass lets shorter
            // ones of its tenant and band go first (it is chunked in the last pass): chats
            // behind a 3,000-token prompt get their first token now, not after it. Other
            // tenants' requests keep their fairness order.
            let left = *budget;
            let head = self.queue.peek(&self.fair).map(|w| (w.owner, w.req.band));
            // `defers` notes what it defers (`Admission::deferred`), so every request it
            // may defer is asked (`would_defer`), not just the first one that can start.
            let Some(next) = self.queue.peek_where_lazily(
                &self.fair,
                |w| {
                    let cached = self.blocks.cached_len(&w.req.block_hashes);
                    let known = w.req.prompt.0 + w.generated.0;
                    let reused = (cached as u64 * bt64).min((known - 1) / bt64 * bt64);
                    let too_long = pass.refuses(known - reused, left.fits(&self.times, reused))
                        || (pass != Pass::Any && Some((w.owner, w.req.band)) != head);
                    let capped = !self.cfg.kv_quotas.is_empty()
                        && self.owners.quota(w.owner).max_blocks.is_some_and(|cap| {
                            self.committed(w.owner) + self.blocks.blocks_for(known)
                                - cached.min(self.blocks.blocks_for(known) as usize) as u32
                                > cap
                        });
                    too_long
                        || capped
                        || self.defers(adm, w.owner, w.req.band)
                        || w.req
                            .block_hashes
                            .get(cached)
                            .is_some_and(|&h| self.prefilling(cached, h))
                },
                |w| self.would_defer(adm, w.owner, w.req.band),
            ) else {
                break;
            };
            let (id, known) = (next.req.id, next.req.prompt.0 + next.generated.0);
            let owner = next.owner;
            // At least the last prompt token is computed, for the first token's logits.
            let mut hit = self.match_prefix(&next.req.block_hashes, known - 1);
            let reused_of = |hit: &Option<(Vec<BlockId>, SeqSlot)>, bt: u32| {
                hit.as_ref().map_or(0, |(b, _)| b.len() as u64) * u64::from(bt)
            };
            let bt = self.blocks.block_tokens();
            let fits = budget.fits(&self.times, reused_of(&hit, bt));
            // A start whose first piece would wait (`piece_waits`) waits in the queue: the
            // piece refused after the start, the start is undone, and undoing one that took
            // a cache entry over clears that entry (the shared-prefix load then computed
            // ~3,300 prefix tokens again, in 3 runs of 7: wall ~47 → 62–66 s).
            let uncached = known - reused_of(&hit, bt);
            if pass.refuses(uncached, fits) || self.piece_waits(budget, uncached, fits) {
                break;
            }
            let mut keep: Vec<SeqSlot> = adm.pinned.clone();
            keep.extend(hit.as_ref().map(|(_, s)| *s));
            let mut adopt = self.adoptable(&hit, &adm.pinned);
            let mut room = self.room_for(owner, known, reused_of(&hit, bt), &keep, !adopt);
            if !room && hit.is_some() {
                // The cached source itself is in the way: recompute instead of reusing.
                hit = None;
                adopt = false;
                keep.clone_from(&adm.pinned);
                room = self.room_for(owner, known, 0, &keep, true);
            }
            let own = self.blocks.blocks_for(known) - self.blocks.blocks_for(reused_of(&hit, bt));
            while !room && self.within_floor(owner, own) {
                // The tenant is owed this much KV: take it from tenants above their floor.
                let Some(v) = self.floor_victim(owner, |r| {
                    keep.contains(&r.slot) || adm.start.iter().any(|(id, _)| *id == r.req.id)
                }) else {
                    break;
                };
                // Its work in this step, if any, goes back to the budget.
                let victim = self.running[v].req.id;
                work.retain(|w| {
                    let keep = w.id != victim;
                    if !keep {
                        budget.tokens += u64::from(w.n);
                    }
                    keep
                });
                self.preempt(v);
                room = self.room_for(owner, known, reused_of(&hit, bt), &keep, !adopt);
            }
            if (!adopt && self.free_slots.is_empty()) || (!room && !self.running.is_empty()) {
                break;
            }
            let reused = reused_of(&hit, bt);
            let slot = match &hit {
                Some((_, src)) if adopt => Some(*src),
                _ => self.take_free_slot(),
            };
            let (Some(Waiting { req, generated, .. }), Some(slot)) = (self.queue.remove(id), slot)
            else {
                break;
            };
            let mut blocks = Vec::new();
            if let Some((matched, src)) = hit {
                if adopt {
                    self.take_over(src, matched.len(), reused);
                } else {
                    for b in &matched {
                        self.blocks.share(*b, slot);
                    }
                    adm.copies.push(PrefixCopy {
                        from: src,
                        to: slot,
                        tokens: reused,
                    });
                    self.touch(src);
                    adm.pinned.push(src);
                }
                blocks = matched;
            }
            // From here its uncached blocks are in flight for the requests behind it
            // (`prefilling` reads the batch).
            adm.start.push((id, slot));
            self.running.push(Running {
                owner,
                charged_prompt: if generated.0 > 0 {
                    req.prompt.0
                } else {
                    reused
                },
                req,
                slot,
                blocks,
                computed: reused,
                quiet_until: 0,
                known,
                generated: generated.0,
                cached: reused,
                planned: false,
            });
            let i = self.running.len() - 1;
            match self.prefill_chunk(i, budget, &adm.pinned) {
                Some(w) => {
                    // Counted once it is really started: a start undone below looks the
                    // prompt up again when it is admitted later.
                    self.stats.prefix_query_tokens += self.running[i].req.prompt.0;
                    self.stats.prefix_hit_tokens += reused;
                    work.push(w);
                }
                None => {
                    // Not even one block: put it back and stop admitting.
                    adm.start.pop();
                    if reused > 0 && !adopt {
                        adm.copies.pop();
                    }
                    let r = self.running.swap_remove(i);
                    for b in &r.blocks {
                        self.blocks.release(*b, r.slot);
                    }
                    if adopt {
                        // The entry it took over is gone: clear the slot instead.
                        self.trim.retain(|(s, _)| *s != r.slot);
                        self.release.push(r.slot);
                    }
                    self.free_slots.push(r.slot);
                    self.queue
                        .push(r.req, r.owner, Tokens(r.generated), r.cached);
                    break;
                }
            }
        }
    }
}

/// Which waiting requests one admission pass takes, by uncached prompt tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Those whose whole prompt fits what is left of the step's budget.
    Whole,
    /// Those with fewer tokens than this (chunked).
    ShorterThan(u64),
    /// Any (chunked).
    Any,
}

impl Pass {
    fn refuses(self, uncached: u64, left: u64) -> bool {
        match self {
            Pass::Whole => uncached > left,
            Pass::ShorterThan(n) => uncached >= n,
            Pass::Any => false,
        }
    }
}

/// What admissions in one plan have decided so far.
#[derive(Default)]
struct Admission {
    start: Vec<(RequestId, SeqSlot)>,
    copies: Vec<PrefixCopy>,
    /// Copy sources: never evicted within this plan.
    pinned: Vec<SeqSlot>,
    /// Whose requests this step starts, when tenants compete (`Scheduler::prefill_lead`).
    lead: Option<Lead>,
    /// Whether another tenant's request was held back for the lead's.
    deferred: std::cell::Cell<bool>,
    /// Running sequences with no work in this step (sorted; `Scheduler::quiet_start`).
    held: Vec<RequestId>,
}

impl Admission {
    fn holds(&self, id: RequestId) -> bool {
        self.held.binary_search(&id).is_ok()
    }
}

/// The tenant a step's prefill goes to, and its place in the queue's order.
#[derive(Clone, Copy, Debug)]
struct Lead {
    owner: u32,
    band: Band,
    counter: u64,
}

impl Scheduler {
    /// Whether a prompt piece with `left` tokens to go, of which the step's time fits
    /// `fits`, waits for a later step: fewer rows than the kernels' fast path fit, and
    /// the step's first piece, the one lifted to those rows whatever the time says, is
    /// taken.
    fn piece_waits(&self, budget: &StepBudget, left: u64, fits: u64) -> bool {
        let fast = u64::from(self.cfg.min_prefill_piece);
        let n = left.min(fits).min(u64::from(self.cfg.max_prefill_chunk));
        n < left && n < fast && budget.secs.is_some() && budget.floor < fast
    }

    fn prefill_chunk(
        &mut self,
        i: usize,
        budget: &mut StepBudget,
        pinned: &[SeqSlot],
    ) -> Option<Work> {
        let r = &self.running[i];
        let left = r.remaining_prefill();
        if left == 0 {
            return None;
        }
        let bt = u64::from(self.blocks.block_tokens());
        let max_chunk = u64::from(self.cfg.max_prefill_chunk);
        let mut n = (left.min(budget.fits(&self.times, r.computed))).min(max_chunk);
        // A piece that does not end its prompt has at least the rows of the kernels' fast
        // path, whatever the time target left: below it every row costs more (llama.cpp's
        // CPU attention deep in a 3,000-token prompt: 48 rows take 92 % of the time of
        // 64, 32 rows 61 %), and a prompt cut to the target's few rows beside decoding
        // streams crawled (`scripts/bench-peers`' mixlong load: 3,000-token prompts' TTFT
        // P50 118 s → 54 s, wall 249 s → 186 s; the chats pay: ITL P99 0.70 s → 0.99 s,
        // TTFT P50 1.7 s → 2.1 s).
        // Only the step's first piece is raised so (while its floor is whole): raising
        // every piece let a step carry a chat's start and a deep chunk, or two deep
        // chunks, each beyond the time target (mixlong: 0.8–0.93 s steps, the chats' ITL
        // P99); a later piece too short for the fast path waits for a step of its own.
        let fast = u64::from(self.cfg.min_prefill_piece);
        if n < left && n < fast {
            if self.piece_waits(budget, left, n) {
                return None;
            }
            n = fast.min(left).min(budget.tokens).min(max_chunk);
        }
        // The tail after the last full block before the final token is always its own
        // piece. A repeat of this prompt reuses exactly those blocks and computes the same
        // tail in the same shape, so a cache hit on a repeat is bit-identical to this run.
        let boundary = (r.known - 1) / bt * bt;
        if r.computed < boundary {
            n = n.min(boundary - r.computed);
        }
        let missing = self
            .blocks
            .blocks_for(r.computed + n)
            .saturating_sub(r.blocks.len() as u32);
        let owner = r.owner;
        self.cap_room(owner, missing, pinned);
        self.ensure_free(missing, pinned, owner);
        // Shrink to what the free blocks, and the tenant's cap, can hold.
        let r = &self.running[i];
        let free = self.blocks.free_count().min(self.cap_headroom(owner));
        let room = (r.blocks.len() as u64 + u64::from(free)) * bt;
        n = n.min(room.saturating_sub(r.computed));
        if n == 0 {
            return None;
        }
        let end = r.computed + n;
        if !self.reserve(i, end, pinned) {
            return None;
        }
        if budget.charge(&self.times, self.running[i].computed, n) {
            self.raised_piece = true;
        }
        let r = &mut self.running[i];
        r.planned = true;
        Some(Work {
            id: r.req.id,
            slot: r.slot,
            pos: r.computed,
            n: n as u32,
            sample: end == r.known,
        })
    }
}
