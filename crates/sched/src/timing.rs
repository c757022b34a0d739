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
            // The least the decodes can have cost: charging them too much would make
            // prefill look cheap, and admission promise what the engine cannot do.
            let base = self
                .decode_estimate(decodes)
                .map_or(0.0, |(_, least)| least);
            let per = ((t - base) / prefill as f64).max(t / prefill as f64 * 0.25);
            self.prefill_token = Some(ewma(self.prefill_token, per));
        }
    }

    /// Estimated seconds of a step of `n` decodes and nothing else (`n` = 0: its fixed
    /// cost): observed, else on the line through the nearest observed sizes on either
    /// side (or the two nearest on one side), kept between constant and proportional
    /// scaling of the nearest one. Proportional scaling alone would charge a GPU's fixed
    /// step cost once per sequence: a 30 ms single-decode step would predict 480 ms for 16.
    pub fn decode_time(&self, n: usize) -> Option<f64> {
        self.decode_estimate(n).map(|(t, _)| t)
    }

    /// [`decode_time`](Self::decode_time), and the least it can be given what was
    /// observed (a step costs at least its nearest smaller observed size, or its
    /// proportional share of the nearest larger one).
    fn decode_estimate(&self, n: usize) -> Option<(f64, f64)> {
        if let Some(Some(t)) = self.decode.get(n) {
            return Some((*t, *t));
        }
        let seen = self
            .decode
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(k, t)| t.map(|t| (k as f64, t)));
        // The two nearest observed sizes below `n`, nearest first, and the two above.
        let (mut below, mut above) = ([None; 2], [None; 2]);
        for (k, t) in seen {
            if k < n as f64 {
                below = [Some((k, t)), below[0]];
            } else if above[0].is_none() {
                above[0] = Some((k, t));
            } else {
                above[1] = Some((k, t));
                break;
            }
        }
        let (near, other) = match (below[0], above[0]) {
            (Some(lo), Some(hi)) => (lo, Some(hi)),
            (Some(lo), None) => (lo, below[1]),
            (None, Some(hi)) => (hi, above[1]),
            (None, None) => return None,
        };
        let (k, t) = near;
        let n = n as f64;
        let line = other.map_or(t * n / k, |(k2, t2)| {
            let slope = ((t2 - t) / (k2 - k)).max(0.0);
            t + slope * (n - k)
        });
        let (lo, hi) = if n < k {
            (t * n / k, t)
        } else {
            (t, t * n / k)
        };
        Some((line.clamp(lo, hi), lo))
    }

    /// Prefill tokens per second while `decodes` sequences decode beside the prefill: the
    /// chunk the planner would give a step (the step's token budget less one per decode,
    /// capped by `target` as in [`prefill_budget`](Self::prefill_budget)) over that step's
    /// predicted time, decodes included. The marginal cost of a prefill token alone would
    /// promise a busy engine the throughput of an idle one.
    pub fn prefill_tokens_per_sec(
        &self,
        decodes: usize,
        step_tokens: u64,
        target: Option<Nanos>,
    ) -> Option<f64> {
        let per = self.prefill_token?;
        let mut chunk = step_tokens.saturating_sub(decodes as u64).max(1);
        if let (true, Some(target)) = (decodes > 0, target) {
            chunk = chunk.min(self.prefill_budget(decodes, target)?);
        }
        // With no decodes the step still pays its fixed cost.
        let step = self.decode_time(decodes).unwrap_or(0.0) + per * chunk as f64;
        Some(chunk as f64 / step.max(1e-9))
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

    #[test]
    fn decode_time_follows_a_fixed_cost_between_and_beyond_observed_sizes() {
        let mut t = StepTimes::default();
        assert_eq!(t.decode_time(3), None);
        // One size seen: proportional scaling is all there is.
        t.observe(2, 0, Nanos::from_millis(40));
        assert!(t.decode_time(4).is_some_and(|s| (s - 0.08).abs() < 1e-9));
        // 30 ms + 5 ms a sequence.
        t = StepTimes::default();
        t.observe(1, 0, Nanos::from_millis(35));
        t.observe(8, 0, Nanos::from_millis(70));
        t.observe(16, 0, Nanos::from_millis(110));
        let at = |n| t.decode_time(n).expect("seen");
        assert!((at(4) - 0.050).abs() < 1e-9, "between: {}", at(4));
        assert!((at(32) - 0.190).abs() < 1e-9, "beyond: {}", at(32));
        assert!((at(8) - 0.070).abs() < 1e-9, "observed: {}", at(8));
        assert!((at(0) - 0.030).abs() < 1e-9, "fixed cost: {}", at(0));
    }

    #[test]
    fn prefill_rate_counts_the_decodes_sharing_each_step() {
        let mut t = StepTimes::default();
        for _ in 0..20 {
            t.observe(4, 0, Nanos::from_millis(40));
            t.observe(4, 100, Nanos::from_millis(290));
            t.observe(0, 500, Nanos::from_millis(1250));
        }
        // Idle: 2.5 ms a token (what the last observation taught), 400 tokens a second.
        let idle = t.prefill_tokens_per_sec(0, 512, None).expect("learned");
        assert!((idle - 400.0).abs() < 1.0, "idle {idle}");
        // Four decodes and a 200 ms target: 64 tokens (the floor) beside 40 ms of decodes.
        let busy = t
            .prefill_tokens_per_sec(4, 512, Some(Nanos::from_millis(200)))
            .expect("learned");
        assert!(busy < idle * 0.85, "busy {busy} vs idle {idle}");
        assert!(
            (busy - 64.0 / (0.04 + 64.0 * 0.0025)).abs() < 1.0,
            "busy {busy}"
        );
    }
}
