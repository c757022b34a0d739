//! Prices per million tokens, in integer nano-USD, and the cost of a request.

use serde::{Deserialize, Serialize};
use tokenfab_types::{NanoUsd, Tokens};

/// A model's price, each in nano-USD per 1,000,000 tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub prompt: NanoUsd,
    /// Prompt tokens served from the prefix cache.
    pub cached: NanoUsd,
    pub completion: NanoUsd,
}

const MTOK: u128 = 1_000_000;

fn ceil_cost(sum: u128) -> NanoUsd {
    NanoUsd(u64::try_from(sum.div_ceil(MTOK)).unwrap_or(u64::MAX))
}

impl Price {
    /// From USD per million tokens as written in config (`0.15`). Rounded to the nano-USD;
    /// negative or non-finite values are refused.
    pub fn from_usd_per_mtok(prompt: f64, cached: f64, completion: f64) -> Result<Price, String> {
        let conv = |what: &str, v: f64| crate::usd(v).map_err(|e| format!("{what} price: {e}"));
        Ok(Price {
            prompt: conv("prompt", prompt)?,
            cached: conv("cached", cached)?,
            completion: conv("completion", completion)?,
        })
    }

    /// Exact cost, rounded up to the next nano-USD.
    pub fn cost(&self, prompt: Tokens, cached: Tokens, completion: Tokens) -> NanoUsd {
        let cached = cached.0.min(prompt.0);
        let uncached = prompt.0 - cached;
        ceil_cost(
            u128::from(uncached) * u128::from(self.prompt.0)
                + u128::from(cached) * u128::from(self.cached.0)
                + u128::from(completion.0) * u128::from(self.completion.0),
        )
    }

    /// The most a request of `prompt` tokens and at most `max_completion` new tokens can
    /// cost, whatever part of its prompt turns out cached.
    pub fn worst_case(&self, prompt: Tokens, max_completion: Tokens) -> NanoUsd {
        let per_prompt = self.prompt.0.max(self.cached.0);
        ceil_cost(
            u128::from(prompt.0) * u128::from(per_prompt)
                + u128::from(max_completion.0) * u128::from(self.completion.0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_exact_and_bounded_by_the_reservation() {
        let p = Price::from_usd_per_mtok(0.15, 0.075, 0.6).expect("valid");
        assert_eq!(p.prompt, NanoUsd(150_000_000));
        // 1000 prompt tokens at $0.15/M = $0.00015 = 150_000 nano-USD.
        assert_eq!(p.cost(Tokens(1000), Tokens(0), Tokens(0)), NanoUsd(150_000));
        assert_eq!(
            p.cost(Tokens(1000), Tokens(1000), Tokens(10)),
            NanoUsd(75_000 + 6_000)
        );
        // Rounded up: one token at a price not divisible by a million.
        let q = Price::from_usd_per_mtok(0.000_001_5, 0.0, 0.0).expect("valid");
        assert_eq!(q.cost(Tokens(1), Tokens(0), Tokens(0)), NanoUsd(1));
        for (prompt, cached, completion, max) in [(10, 3, 4, 4), (0, 0, 0, 0), (7, 7, 1, 9)] {
            assert!(
                p.cost(Tokens(prompt), Tokens(cached), Tokens(completion))
                    <= p.worst_case(Tokens(prompt), Tokens(max))
            );
        }
        assert!(Price::from_usd_per_mtok(-1.0, 0.0, 0.0).is_err());
        assert!(Price::from_usd_per_mtok(f64::NAN, 0.0, 0.0).is_err());
    }
}
