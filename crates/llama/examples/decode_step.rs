//! Time one batched decode step of the real executor, per KV layout.
//!
//! `cargo run --release -p tokenfab-llama --example decode_step -- [SEQS] [PROMPT] [STEPS]`
//! (defaults 16, 150, 40): SEQS sequences of PROMPT tokens each are prefilled, then STEPS
//! decode steps of one token per sequence are timed in each layout; prints the median.
//! Uses the default model from the local cache (`tokenfab pull` fetches it).

mod common;

use std::time::Instant;
use tokenfab_engine::{BatchEntry, Executor};
use tokenfab_llama::KvLayout;
use tokenfab_types::{SeqSlot, TokenId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        std::env::args()
            .nth(i)
            .map_or(Ok(default), |a| a.parse().map_err(Into::into))
    };
    let (seqs, prompt, steps) = (arg(1, 16)?, arg(2, 150)?, arg(3, 40)?.max(1));
    let model = common::default_model()?;
    let seq_cells = prompt + steps + 256;
    for layout in [KvLayout::Unified, KvLayout::PerSequence] {
        let (mut exec, greedy) = common::executor(&model, seq_cells * seqs, layout, seqs)?;
        let filler = |s: usize, p: usize| TokenId(((s * 7919 + p * 31) % 40_000 + 100) as i32);
        for s in 0..seqs {
            let slot = SeqSlot(s as u32);
            exec.begin(slot, &greedy);
            let tokens: Vec<TokenId> = (0..prompt).map(|p| filler(s, p)).collect();
            for (k, piece) in tokens.chunks(256).enumerate() {
                exec.run(&[BatchEntry {
                    slot,
                    pos: (k * 256) as u64,
                    tokens: piece,
                    sample: true,
                }])?;
            }
        }
        let mut times = Vec::with_capacity(steps);
        for step in 0..steps {
            let tokens: Vec<[TokenId; 1]> = (0..seqs).map(|s| [filler(s, prompt + step)]).collect();
            let batch: Vec<BatchEntry<'_>> = tokens
                .iter()
                .enumerate()
                .map(|(s, t)| BatchEntry {
                    slot: SeqSlot(s as u32),
                    pos: (prompt + step) as u64,
                    tokens: t,
                    sample: true,
                })
                .collect();
            let t0 = Instant::now();
            exec.run(&batch)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{layout:?}: {seqs} sequences of {prompt} tokens: decode step median {median:.1} ms ({:.0} tokens/s)",
            seqs as f64 * 1e3 / median
        );
    }
    Ok(())
}
