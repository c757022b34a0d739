//! A model of step time learned from the executor's reports: decode-only step time by
//! batch size, and the marginal cost of a prefill token. The planner uses it to size
//! prefill chunks so that streams in the batch keep their inter-token target, and
//! admission uses it to predict time to first token.

use tokenfab_types::Nanos;

/// Weight of a new observation in the moving averages.
const ALPHA: f64 = 0.2;

/// Smallest prefill (tokens) a step must carry to teach the per-token cost.
const MIN_PREFILL_SAMPLE: u64 = 64;

/// Prefill tokens a step always gets beside decodes, whatever the model says.
pub const MIN_PREFILL_BUDGET: u64 = 64;

#[derive(Clone, Debug, Default)]
pub struct StepTimes {
    /// Seconds of a decode-only step, indexed by the number of decodes.
    decode: Vec<Option<f64>>,
    /// Seconds per prefill token on top of the decodes sharing the step.
    prefill_token: Option<f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| (1.0 - ALPHA) * o + ALPHA * new)
}

impl StepTimes {
    /// Record one executed step: `decodes` single-token decodes plus `prefill` tokens.
    pub fn observe(&mut self, decodes: usize, prefill: u64, elapsed: Nanos) {
        let t = elapsed.as_secs_f64();
        if t <= 0.0 {
            return;
        }
        if prefill == 0 {
            if self.decode.len() <= decodes {
                self.decode.resize(decodes + 1, None);
            }
            self.decode[decodes] = Some(ewma(self.decode[decodes], t));
        } else if prefill >= MIN_PREFILL_SAMPLE {
            // Only sizeable prefills: with a few tokens the step's fixed costs would be
            // charged to them, the estimate would grow, budgets shrink, and the planner
            // would spiral into ever smaller (ever less efficient) chunks.
            let base = self.decode_time(decodes).unwrap_or(0.0);
            let per = ((t - base) / prefill as f64).max(t / prefill as f64 * 0.25);
            self.prefill_token = Some(ewma(self.prefill_token, per));
        }
    }

    /// Estimated seconds of a decode-only step of `n` decodes: the nearest observed size,
    /// scaled linearly.
    pub fn decode_time(&self, n: usize) -> Option<f64> {
        if n == 0 {
            return Some(0.0);
        }
        let (k, t) = self
            .decode
            .iter()
            .enumerate()
            .filter_map(|(k, t)| t.map(|t| (k, t)))
            .filter(|(k, _)| *k > 0)
            .min_by_key(|(k, _)| k.abs_diff(n))?;
        Some(t * n as f64 / k as f64)
    }

    pub fn prefill_tokens_per_sec(&self) -> Option<f64> {
        self.prefill_token.map(|c| 1.0 / c.max(1e-9))
    }

    /// Prefill tokens that fit beside `decodes` decodes within `target`; `None` while the
    /// model has not seen enough steps to say.
    pub fn prefill_budget(&self, decodes: usize, target: Nanos) -> Option<u64> {
        let base = self.decode_time(decodes)?;
        let per = self.prefill_token?;
        let left = target.as_secs_f64() - base;
        Some(((left.max(0.0) / per) as u64).max(MIN_PREFILL_BUDGET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_decode_and_prefill_costs() {
        let mut t = StepTimes::default();
        assert_eq!(t.prefill_budget(4, Nanos::from_millis(200)), None);
        for _ in 0..20 {
            t.observe(4, 0, Nanos::from_millis(40));
            t.observe(4, 100, Nanos::from_millis(290));
        }
        let budget = t
            .prefill_budget(4, Nanos::from_millis(200))
            .expect("learned");
        assert!((55..=65).contains(&budget), "budget {budget}");
        assert!(t.decode_time(8).is_some_and(|s| (s - 0.08).abs() < 1e-6));
    }
}
