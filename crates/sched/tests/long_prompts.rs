//! Scenario tests of the step planner with long prompts: chats beside a long prefill,
//! pieces of the kernels' fast path, one lifted piece per step and a step without one
//! after it, steps ending prompts, long prompts oldest first, lingering for arrivals
//! after requests end, and starts that must wait.

mod common;

use common::{config, Harness};
use tokenfab_sched::{Band, SchedConfig};
use tokenfab_types::RequestId;

/// Room for a 3,000-token prompt and a few chats, `step` tokens per step.
fn long_prompt_config(step: u32) -> SchedConfig {
    let mut cfg = config();
    cfg.kv_blocks = 400;
    cfg.slots = 16;
    cfg.max_running = 8;
    cfg.max_step_tokens = step;
    // A chat is short (one chunk: see pass 4 of `plan`) whatever the step's size.
    cfg.max_prefill_chunk = 512;
    cfg.max_seq_tokens = 4000;
    cfg.max_waiting_tokens = 100_000;
    cfg
}

/// [`long_prompt_config`], with the long prompt arrived first.
fn behind_a_long_prompt(step: u32) -> Harness {
    let mut h = Harness::new(long_prompt_config(step));
    h.arrive("a", Band::Standard, 3000, 8);
    h
}

#[test]
fn chats_queued_behind_a_long_prompt_get_their_first_token_in_its_first_step() {
    let mut h = behind_a_long_prompt(256);
    for _ in 0..3 {
        h.arrive("a", Band::Standard, 40, 8);
    }
    // First step: the three chats start (each up to its last full block: the tail before
    // the final token is its own piece, so that a cache hit repeats the same shapes); the
    // long prompt, first in line, takes what is left of the budget as its first chunk.
    let first = h.step(0);
    let chats = [RequestId(2), RequestId(3), RequestId(4)];
    let ids: Vec<RequestId> = first.iter().map(|d| d.0).collect();
    assert_eq!(ids, [&chats[..], &[RequestId(1)]].concat(), "{first:?}");
    let long = first.iter().find(|d| d.0 == RequestId(1)).map(|d| d.1);
    assert_eq!(long, Some(256 - 3 * 32));
    // Second step: their tails, and with them their first tokens.
    let second = h.step(0);
    for c in chats {
        assert!(second.iter().any(|d| d.0 == c && d.1 == 8), "{second:?}");
    }
    assert_eq!(h.s.check_invariants(), Ok(()));
}

#[test]
fn a_chat_too_long_for_one_step_still_starts_beside_a_long_prefill() {
    let mut h = behind_a_long_prompt(64);
    h.step(0);
    // A 100-token chat arrives while the long prompt has ~2,900 tokens to go: it starts
    // in the next step, with half the budget, and the long prompt keeps the other half.
    h.arrive("a", Band::Standard, 100, 8);
    let next = h.step(0);
    assert_eq!(
        next.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
        vec![(RequestId(2), 32), (RequestId(1), 32)],
    );
    // It has its first token long before the long prompt is done.
    let mut steps = 1;
    while h.s.is_running(RequestId(2)) && h.step(0).iter().any(|d| d.0 == RequestId(2) && !d.2) {
        steps += 1;
    }
    assert!(steps <= 4, "{steps} steps to prefill 100 tokens");
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// Six chats with 400 tokens to generate, arrived first, and the executor's fast path
/// at `fast` rows (`min_prefill_piece`).
fn six_chats_decoding(fast: u32) -> Harness {
    let mut cfg = long_prompt_config(512);
    cfg.max_waiting = 16;
    cfg.min_prefill_piece = fast;
    let mut h = Harness::new(cfg);
    for _ in 0..6 {
        h.arrive("a", Band::Standard, 40, 400);
    }
    h
}

/// The prefill pieces of request 1 (a 3,000-token prompt) while 6 chats decode beside it,
/// with the executor's fast path at `fast` rows.
fn long_prompt_pieces_beside_chats(fast: u32) -> Vec<u64> {
    let mut h = six_chats_decoding(fast);
    h.arrive("a", Band::Standard, 3000, 8);
    let long = RequestId(7);
    let mut pieces = Vec::new();
    for _ in 0..500 {
        for (id, n, decode) in h.step(0) {
            if id == long && !decode {
                pieces.push(n);
            }
        }
        assert_eq!(h.s.check_invariants(), Ok(()));
        if pieces.iter().sum::<u64>() >= 3000 {
            break;
        }
    }
    assert_eq!(pieces.iter().sum::<u64>(), 3000, "{pieces:?}");
    pieces
}

/// Beside decoding chats the step's time target leaves a long prompt fewer rows than the
/// kernels' fast path takes (`min_prefill_piece`); its pieces still have that many, all
/// but its last two (the piece up to its last full block, and the tail).
#[test]
fn a_long_prompt_is_cut_into_pieces_of_the_fast_path_beside_decodes() {
    let slow = long_prompt_pieces_beside_chats(1);
    assert!(
        slow.iter().filter(|&&n| n < 64).count() > 10,
        "the time target alone cuts short pieces: {slow:?}"
    );
    let fast = long_prompt_pieces_beside_chats(64);
    let body = &fast[..fast.len() - 2];
    assert!(body.iter().all(|&n| n >= 64), "{fast:?}");
    assert!(
        fast.len() < slow.len(),
        "{} vs {} pieces",
        fast.len(),
        slow.len()
    );
}

/// Two long prompts beside decoding chats, when the time target leaves fewer rows than
/// the fast path: only the step's first piece is raised to the fast path's rows, so a
/// step carries one such piece, not one per long prompt (each piece deep in a 3,000-token
/// prompt took ~0.45 s on 2 CPU cores, and two of them doubled the chats' gap between
/// tokens); both prompts still finish.
#[test]
fn only_the_first_piece_of_a_step_is_raised_to_the_fast_path() {
    let mut h = six_chats_decoding(64);
    h.arrive("a", Band::Standard, 3000, 8);
    h.arrive("a", Band::Standard, 3000, 8);
    let longs = [RequestId(7), RequestId(8)];
    let mut done = [0u64; 2];
    for _ in 0..500 {
        let step = h.step(0);
        let decodes = step.iter().filter(|d| d.2).count();
        let long_pieces: Vec<u64> = (step.iter())
            .filter(|d| !d.2 && longs.contains(&d.0))
            .map(|d| d.1)
            .collect();
        for d in step.iter().filter(|d| !d.2) {
            if let Some(i) = longs.iter().position(|&l| l == d.0) {
                done[i] += d.1;
            }
        }
        if decodes == 6 {
            assert!(long_pieces.len() <= 1, "{step:?}");
        }
        assert_eq!(h.s.check_invariants(), Ok(()));
        if done.iter().all(|&d| d >= 3000) {
            break;
        }
    }
    assert_eq!(done, [3000, 3000]);
}

/// The step that computes a chat's tail (its first token) beside a long prompt, with
/// nothing decoding, keeps to the target step time, not the idle one: the chat's client
/// waits on it as on a decode.
#[test]
fn a_step_ending_a_prompt_keeps_to_the_target_time() {
    let mut h = behind_a_long_prompt(512);
    // Teach the time model, with the long prompt alone (idle steps).
    let mut idle_piece = 0;
    for _ in 0..6 {
        idle_piece = h.step(0).iter().map(|d| d.1).sum::<u64>();
    }
    h.arrive("a", Band::Standard, 40, 8);
    let start = h.step(0);
    assert!(start.iter().any(|d| d.0 == RequestId(2)), "{start:?}");
    let tail = h.step(0);
    let chat = tail.iter().find(|d| d.0 == RequestId(2));
    assert_eq!(chat.map(|d| d.1), Some(8), "{tail:?}");
    let total: u64 = tail.iter().map(|d| d.1).sum();
    assert!(
        total * 2 <= idle_piece + 16,
        "{total} vs idle {idle_piece}: {tail:?}"
    );
    assert_eq!(h.s.check_invariants(), Ok(()));
}

/// Long prompts beside decoding chats are prefilled oldest first: a shorter one arriving
/// later does not overtake one that has most of its prompt to go (least-left-first did,
/// again and again, while the time target leaves room for one piece per step).
#[test]
fn long_prompts_are_prefilled_oldest_first() {
    let mut h = six_chats_decoding(64);
    h.arrive("a", Band::Standard, 3000, 8);
    for _ in 0..6 {
        h.step(0);
    }
    h.arrive("a", Band::Standard, 2000, 8);
    let (older, newer) = (RequestId(7), RequestId(8));
    let mut first_token = Vec::new();
    for _ in 0..1000 {
        for (id, _, decode) in h.step(0) {
            if decode && (id == older || id == newer) && !first_token.contains(&id) {
                first_token.push(id);
            }
        }
        assert_eq!(h.s.check_invariants(), Ok(()));
        if first_token.len() == 2 {
            break;
        }
    }
    assert_eq!(first_token, [older, newer]);
}

/// After a step that ended requests, a driver may wait for their clients' next requests
/// before a step that would otherwise only prefill a prompt already running (timed as
/// idle: long): not before a step with a stream decoding (short anyway), nor when
/// nothing runs (the driver waits for arrivals then anyway), and once per ending step.
#[test]
fn a_step_after_ends_with_only_prefill_left_may_wait_for_arrivals() {
    let mut h = Harness::new(long_prompt_config(512));
    h.arrive("a", Band::Standard, 40, 2);
    h.arrive("a", Band::Standard, 40, 4);
    h.arrive("a", Band::Standard, 3000, 1);
    let mut ends = Vec::new();
    for _ in 0..40 {
        let ended_before = h.ended.len();
        h.step(0);
        if h.ended.len() > ended_before {
            ends.push(h.s.next_step_follows_ends());
            assert!(!h.s.next_step_follows_ends(), "asked twice");
        } else {
            assert!(!h.s.next_step_follows_ends());
        }
        if h.ended.len() == 3 {
            break;
        }
    }
    // Request 1 ended beside request 2's decoding, request 2 beside the long prompt's
    // prefill, which ended last.
    assert_eq!(ends, [false, true, false]);
}

/// A request that would take a cached prefix's slot over (per-sequence KV layout) but
/// whose first piece must wait for a later step (the step's fast-path piece is taken,
/// and the time left fits fewer rows) stays queued: starting it and undoing the start
/// cleared the cache entry it had taken over, and the prefix was computed again.
#[test]
fn a_start_that_must_wait_keeps_the_cache_entry_it_would_take_over() {
    let mut cfg = long_prompt_config(512);
    cfg.max_waiting = 16;
    cfg.min_prefill_piece = 64;
    cfg.adopt_cached_slots = true;
    let mut h = Harness::new(cfg);
    // A prompt of group 1 runs alone and is cached (its 96-token shared prefix; short
    // enough that the next prompt of the group takes its slot over).
    h.arrive_grouped("a", Band::Standard, 150, 1, Some(1));
    while !h.ended.contains_key(&RequestId(1)) {
        h.step(0);
    }
    // Chats decode (the time target leaves fewer rows than the fast path), a long
    // prompt takes each step's lifted piece, and another prompt of group 1 arrives.
    for _ in 0..6 {
        h.arrive("a", Band::Standard, 40, 400);
    }
    for _ in 0..4 {
        h.step(0);
    }
    h.arrive("a", Band::Standard, 3000, 8);
    h.step(0);
    h.arrive_grouped("a", Band::Standard, 300, 1, Some(1));
    let hits_before = h.s.stats().prefix_hit_tokens;
    for _ in 0..200 {
        h.step(0);
        assert_eq!(h.s.check_invariants(), Ok(()));
        if h.ended.contains_key(&RequestId(9)) {
            break;
        }
    }
    assert!(h.ended.contains_key(&RequestId(9)));
    assert_eq!(h.s.stats().prefix_hit_tokens - hits_before, 96);
}

/// After a step whose piece got more rows than its time left (lifted to the fast path),
/// the next step gives the streams decoding beside it a token with no lifted piece (a
/// piece that fits its time, such as the prompt's tail, may still run): two lifted
/// pieces never follow each other while chats decode.
#[test]
fn two_lifted_pieces_never_follow_each_other_beside_decodes() {
    let mut h = six_chats_decoding(64);
    h.arrive("a", Band::Standard, 3000, 8);
    let long = RequestId(7);
    let (mut lifted_before, mut pieces, mut decode_only) = (false, 0, 0);
    for _ in 0..200 {
        let step = h.step(0);
        // The toy step-time model leaves 6 decoding streams time for 48 rows: a piece of
        // 64 is lifted; longer ones, before the model has learned, fit their time.
        let piece = step.iter().find(|d| d.0 == long && !d.2).map(|d| d.1);
        if step.iter().filter(|d| d.2).count() == 6 {
            assert!(
                !(lifted_before && piece == Some(64)),
                "a lifted piece right after a lifted one: {step:?}"
            );
            pieces += usize::from(piece.is_some());
            decode_only += usize::from(piece.is_none());
        }
        lifted_before = piece == Some(64);
        assert_eq!(h.s.check_invariants(), Ok(()));
    }
    assert!(
        pieces > 20 && decode_only > 20,
        "{pieces} pieces, {decode_only} without"
    );
}
