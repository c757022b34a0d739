//! Time the prefill of one long prompt in chunks: how a chunk's cost grows with the
//! context it attends to.
//!
//! `cargo run --release -p tokenfab-llama --example prefill_chunk -- [PROMPT] [CHUNK]...`
//! (defaults 3000, then 64 256 512): for each CHUNK, prefills PROMPT tokens of one
//! sequence in pieces of CHUNK tokens and prints the milliseconds per token of the
//! pieces starting in each quarter of the prompt, and the total.
//! Uses the default model from the local cache (`tokenfab pull` fetches it).

mod common;

use std::time::Instant;
use tokenfab_engine::{BatchEntry, Executor};
use tokenfab_llama::KvLayout;
use tokenfab_types::{SeqSlot, TokenId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let prompt = args.first().copied().unwrap_or(3000);
    let chunks = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![64, 256, 512]
    };
    let model = common::default_model()?;
    let (mut exec, greedy) = common::executor(&model, prompt + 256, KvLayout::Unified, 1)?;
    let tokens: Vec<TokenId> = (0..prompt)
        .map(|p| TokenId(((p * 7919) % 40_000 + 100) as i32))
        .collect();
    let slot = SeqSlot(0);
    for chunk in chunks {
        let chunk = chunk.clamp(1, 512);
        exec.release(slot);
        exec.begin(slot, &greedy);
        // Milliseconds and tokens per quarter of the prompt.
        let mut quarters = [(0.0f64, 0usize); 4];
        let t_all = Instant::now();
        for (k, piece) in tokens.chunks(chunk).enumerate() {
            let pos = k * chunk;
            let t0 = Instant::now();
            exec.run(&[BatchEntry {
                slot,
                pos: pos as u64,
                tokens: piece,
                sample: true,
            }])?;
            let q = &mut quarters[(pos * 4 / prompt).min(3)];
            q.0 += t0.elapsed().as_secs_f64() * 1e3;
            q.1 += piece.len();
        }
        let total = t_all.elapsed().as_secs_f64();
        let per: Vec<String> = quarters
            .iter()
            .map(|(ms, n)| format!("{:.2}", ms / (*n).max(1) as f64))
            .collect();
        println!(
            "chunk {chunk}: ms/token by quarter of the prompt [{}]; {prompt} tokens in {total:.2} s ({:.0} tokens/s)",
            per.join(", "),
            prompt as f64 / total
        );
    }
    Ok(())
}
