//! Token sampling per sequence. The two common cases — greedy, and temperature alone
//! (OpenAI clients rarely send top_k, and top_p defaults to 1) — read the logits row in
//! place: llama.cpp's sampler first copies all 49k candidates of the vocabulary into an
//! array and normalises every one of them, ~0.45 ms per sequence here, which at 16
//! sequences was ~8 % of a decode step. top_k / top_p go through llama.cpp's chain.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenfab_engine::SamplingParams;

/// Logits this far (in units of temperature) below the maximum carry less than e^-30 of
/// its weight each; over a 49k vocabulary their total is below f32 rounding of the sum.
const NEGLIGIBLE: f32 = 30.0;

pub(crate) enum Sampler {
    Greedy,
    Temperature { inv_temp: f32, rng: Box<StdRng> },
    Chain(LlamaSampler),
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Sampler {
        if p.temperature <= 0.0 {
            return Sampler::Greedy;
        }
        if p.top_k == 0 && p.top_p >= 1.0 {
            return Sampler::Temperature {
                inv_temp: 1.0 / p.temperature,
                rng: Box::new(StdRng::seed_from_u64(p.seed)),
            };
        }
        let mut chain = Vec::with_capacity(4);
        if p.top_k > 0 {
            chain.push(LlamaSampler::top_k(p.top_k as i32));
        }
        if p.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(p.top_p, 1));
        }
        chain.push(LlamaSampler::temp(p.temperature));
        // llama.cpp seeds are 32-bit; fold the 64-bit seed so every bit counts.
        let seed = (p.seed ^ (p.seed >> 32)) as u32;
        chain.push(LlamaSampler::dist(seed));
        Sampler::Chain(LlamaSampler::chain_simple(chain))
    }

    /// The next token from the logits of batch row `row`.
    pub fn sample(&mut self, ctx: &LlamaContext<'_>, row: i32) -> LlamaToken {
        match self {
            Sampler::Greedy => LlamaToken(argmax(ctx.get_logits_ith(row)) as i32),
            Sampler::Temperature { inv_temp, rng } => {
                let u: f64 = rng.gen();
                LlamaToken(draw(ctx.get_logits_ith(row), *inv_temp, u) as i32)
            }
            Sampler::Chain(s) => s.sample(ctx, row),
        }
    }
}

/// The first index of the largest logit (NaNs never win).
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || (logits[best].is_nan() && !l.is_nan()) {
            best = i;
        }
    }
    best
}

/// Draw from softmax(logits × inv_temp) with `u` uniform in [0, 1).
fn draw(logits: &[f32], inv_temp: f32, u: f64) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    let floor = max - NEGLIGIBLE / inv_temp;
    let weight = |l: f32| f64::from(((l - max) * inv_temp).exp());
    let total: f64 = logits
        .iter()
        .filter(|&&l| l >= floor)
        .map(|&l| weight(l))
        .sum();
    let mut r = u * total;
    let mut last = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l >= floor {
            r -= weight(l);
            last = i;
            if r < 0.0 {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.0]), 1);
    }

    #[test]
    fn draws_follow_the_softmax_at_the_temperature() {
        // softmax([ln 1, ln 3]) at temperature 1 = [0.25, 0.75]; at 0.5 = [0.1, 0.9].
        let logits = [1f32.ln(), 3f32.ln(), -1000.0];
        let share = |inv_temp: f32| {
            let n = 10_000;
            let ones = (0..n)
                .filter(|k| draw(&logits, inv_temp, (*k as f64 + 0.5) / n as f64) == 1)
                .count();
            ones as f64 / n as f64
        };
        assert!((share(1.0) - 0.75).abs() < 1e-3, "{}", share(1.0));
        assert!((share(2.0) - 0.9).abs() < 1e-3, "{}", share(2.0));
        // The negligible tail is never drawn, and u near 1 still yields a valid token.
        assert_ne!(draw(&logits, 1.0, 0.999_999_9), 2);
        assert_eq!(draw(&[f32::NAN, f32::NAN], 1.0, 0.5), 0);
    }
}
