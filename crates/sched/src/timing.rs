//! A model of step time learned from the executor's reports: decode-only step time by
//! batch size, and the cost of prefill — per token, plus per token of context each
//! prefill row attends to (a chunk deep in a 3,000-token prompt costs ~1.7× one at its
//! start on the CPU engine: `examples/prefill_chunk`). The planner uses it to size
//! prefill chunks so that streams in the batch keep their inter-token target, and
//! admission uses it to predict time to first token.

use tokenfab_types::Nanos;

/// Weight of a new observation in the decode-time moving averages.
const ALPHA: f64 = 0.2;

/// Weight an observation keeps per later step in the step-time fit (~50 steps of memory:
/// the model follows a machine whose speed drifts).
const FORGET: f64 = 0.98;

/// Ridge added to the fit's normal equations per feature (in the scaled units of
/// [`UNIT`]): keeps a coefficient the recent steps cannot tell apart from another small
/// instead of letting the two run off in opposite directions. Heavier on the fixed and
/// per-decode costs: when the steps seen cannot separate them from prefill (every chunk
/// the same size), time is charged to prefill tokens, which errs towards smaller chunks
/// (streams keep their target) rather than longer steps.
const RIDGE: [f64; 4] = [1e-1, 1e-1, 1e-3, 1e-3];

/// The fit's features — 1, decodes, prefill tokens, attended KV tokens — in units of the
/// size they typically have, so that one ridge suits all four.
const UNIT: [f64; 4] = [1.0, 16.0, 256.0, 256.0 * 2048.0];

/// Steps the fit must have seen before the planner trusts it for prefill; until then
/// prefill is limited by the step's token budget alone.
const MIN_FIT_STEPS: u32 = 2;

/// Prefill tokens a step always gets beside decodes at the start of a prompt, whatever
/// the model says.
const MIN_PREFILL_BUDGET: u64 = 64;

/// KV tokens that prefill rows of `n` tokens starting at position `pos` attend to, in all:
/// row `pos + k` reads `pos + k + 1` cells.
pub fn attended(pos: u64, n: u64) -> u64 {
    n * pos + n * (n + 1) / 2
}

#[derive(Clone, Debug, Default)]
pub struct StepTimes {
    /// Seconds of a decode-only step, indexed by the number of decodes.
    decode: Vec<Option<f64>>,
    /// Every step, as `base + per_decode × decodes + per_token × prefill tokens +
    /// per_attended × attended KV tokens`.
    fit: StepFit,
}

/// Exponentially weighted ridge least squares over the steps, with non-negative
/// coefficients (a feature whose coefficient would come out negative is dropped and the
/// rest refitted).
#[derive(Clone, Debug, Default)]
struct StepFit {
    xtx: [[f64; 4]; 4],
    xty: [f64; 4],
    steps: u32,
    /// Seconds per unit of each feature (unscaled), refitted after each step.
    coef: [f64; 4],
}

impl StepFit {
    fn add(&mut self, x: [f64; 4], y: f64) {
        let x: Vec<f64> = x.iter().zip(UNIT).map(|(v, u)| v / u).collect();
        for i in 0..4 {
            for j in 0..4 {
                self.xtx[i][j] = FORGET * self.xtx[i][j] + x[i] * x[j];
            }
            self.xty[i] = FORGET * self.xty[i] + x[i] * y;
        }
        self.steps = self.steps.saturating_add(1);
        self.coef = self.solve();
    }

    fn solve(&self) -> [f64; 4] {
        let mut active = [true; 4];
        loop {
            let idx: Vec<usize> = (0..4).filter(|&i| active[i]).collect();
            let k = idx.len();
            if k == 0 {
                return [0.0; 4];
            }
            // Gaussian elimination with partial pivoting on the active subsystem.
            let mut m: Vec<Vec<f64>> = idx
                .iter()
                .map(|&i| {
                    let mut row: Vec<f64> = idx.iter().map(|&j| self.xtx[i][j]).collect();
                    row[idx.iter().position(|&j| j == i).unwrap_or(0)] += RIDGE[i];
                    row.push(self.xty[i]);
                    row
                })
                .collect();
            for c in 0..k {
                let p = (c..k)
                    .max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))
                    .unwrap_or(c);
                m.swap(c, p);
                let d = m[c][c];
                if d.abs() < 1e-12 {
                    continue;
                }
                let pivot = m[c].clone();
                for (r, row) in m.iter_mut().enumerate() {
                    if r != c {
                        let f = row[c] / d;
                        for (v, p) in row.iter_mut().zip(&pivot).skip(c) {
                            *v -= f * p;
                        }
                    }
                }
            }
            let mut coef = [0.0; 4];
            for (row, &i) in idx.iter().enumerate() {
                let d = m[row][row];
                coef[i] = if d.abs() < 1e-12 {
                    0.0
                } else {
                    m[row][k] / d / UNIT[i]
                };
            }
            match (0..4)
                .filter(|&i| active[i] && coef[i] < 0.0)
                .min_by(|&a, &b| (coef[a] * UNIT[a]).total_cmp(&(coef[b] * UNIT[b])))
            {
                Some(worst) => active[worst] = false,
                None => return coef,
            }
        }
    }

    fn ready(&self) -> bool {
        self.steps >= MIN_FIT_STEPS
    }
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| (1.0 - ALPHA) * o + ALPHA * new)
}

impl StepTimes {
    /// Record one executed step: `decodes` single-token decodes plus `prefill` tokens
    /// whose rows attended to `attended` KV tokens in all (see [`attended`]).
    pub fn observe(&mut self, decodes: usize, prefill: u64, attended: u64, elapsed: Nanos) {
        // A step of no measurable time is data too (an instant executor): prefill then
        // costs nothing and chunks are limited by tokens alone.
        let t = elapsed.as_secs_f64();
        if prefill == 0 {
            if self.decode.len() <= decodes {
                self.decode.resize(decodes + 1, None);
            }
            self.decode[decodes] = Some(ewma(self.decode[decodes], t));
        }
        let x = [1.0, decodes as f64, prefill as f64, attended as f64];
        self.fit.add(x, t);
    }

    /// Estimated seconds of a step of `n` decodes and nothing else (`n` = 0: its fixed
    /// cost): observed, else on the line through the nearest observed sizes on either
    /// side (or the two nearest on one side), kept between constant and proportional
    /// scaling of the nearest one. Proportional scaling alone would charge a GPU's fixed
    /// step cost once per sequence: a 30 ms single-decode step would predict 480 ms for 16.
    pub fn decode_time(&self, n: usize) -> Option<f64> {
        if let Some(Some(t)) = self.decode.get(n) {
            return Some(*t);
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
            // No decode-only step seen (prefill in every step so far): the fit's part.
            (None, None) => {
                return self
                    .fit
                    .ready()
                    .then(|| self.fit.coef[0] + self.fit.coef[1] * n as f64);
            }
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
        Some(line.clamp(lo, hi))
    }

    /// Predicted seconds of a prefill chunk of `n` tokens starting at position `pos`.
    pub fn prefill_time(&self, pos: u64, n: u64) -> Option<f64> {
        let (a, b) = self.prefill_coefficients()?;
        Some(a * n as f64 + b * attended(pos, n) as f64)
    }

    /// The most tokens of a chunk starting at `pos` that fit in `secs` (largest `n` with
    /// `prefill_time(pos, n) ≤ secs`); `None` while the model has not seen a prefill.
    pub fn prefill_fit(&self, secs: f64, pos: u64) -> Option<u64> {
        let (a, b) = self.prefill_coefficients()?;
        let secs = secs.max(0.0);
        // b/2·n² + (a + b·(pos + 1/2))·n − secs ≤ 0.
        let lin = a + b * (pos as f64 + 0.5);
        let n = if b > 0.0 {
            ((lin * lin + 2.0 * b * secs).sqrt() - lin) / b
        } else if lin > 0.0 {
            secs / lin
        } else {
            return Some(u64::MAX);
        };
        Some(n.max(0.0).min(u64::MAX as f64 / 2.0) as u64)
    }

    /// Prefill tokens per second while `decodes` sequences decode beside the prefill: the
    /// chunk the planner would give a step at the start of a prompt (the step's token
    /// budget less one per decode, capped by `target` as in
    /// [`prefill_secs`](Self::prefill_secs)) over that step's predicted time, decodes
    /// included. The marginal cost of a prefill token alone would promise a busy engine
    /// the throughput of an idle one.
    pub fn prefill_tokens_per_sec(
        &self,
        decodes: usize,
        step_tokens: u64,
        target: Option<Nanos>,
    ) -> Option<f64> {
        let mut chunk = step_tokens.saturating_sub(decodes as u64).max(1);
        if let (true, Some(target)) = (decodes > 0, target) {
            let secs = self.prefill_secs(decodes, target);
            chunk = chunk.min(self.prefill_fit(secs, 0)?.max(MIN_PREFILL_BUDGET));
        }
        // With no decodes the step still pays its fixed cost.
        let step = self.decode_time(decodes).unwrap_or(0.0) + self.prefill_time(0, chunk)?;
        Some(chunk as f64 / step.max(1e-9))
    }

    /// Seconds of prefill that fit beside `decodes` decodes within `target` (all of it
    /// while no decode step has been seen), and never less than what
    /// [`MIN_PREFILL_BUDGET`] tokens at the start of a prompt take: when decodes alone
    /// fill the target, prompts still move (deep in a long prompt, by fewer tokens).
    pub fn prefill_secs(&self, decodes: usize, target: Nanos) -> f64 {
        let base = self.decode_time(decodes).unwrap_or(0.0);
        let least = self.prefill_time(0, MIN_PREFILL_BUDGET).unwrap_or(0.0);
        (target.as_secs_f64() - base).max(least)
    }

    /// Seconds per prefill token and per attended KV token, as fitted so far.
    pub fn prefill_coefficients(&self) -> Option<(f64, f64)> {
        self.fit
            .ready()
            .then_some((self.fit.coef[2], self.fit.coef[3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_decode_and_prefill_costs() {
        let mut t = StepTimes::default();
        assert_eq!(t.prefill_fit(0.2, 0), None);
        for _ in 0..20 {
            t.observe(4, 0, 0, Nanos::from_millis(40));
            t.observe(4, 100, attended(0, 100), Nanos::from_millis(290));
        }
        let secs = t.prefill_secs(4, Nanos::from_millis(200));
        assert!((secs - 0.160).abs() < 1e-9, "secs {secs}");
        // Every prefill seen started at 0: no context term to learn, 2.5 ms a token.
        let budget = t.prefill_fit(secs, 0).expect("learned");
        assert!((63..=64).contains(&budget), "budget {budget}");
        assert!(t.decode_time(8).is_some_and(|s| (s - 0.08).abs() < 1e-6));
    }

    #[test]
    fn decode_time_follows_a_fixed_cost_between_and_beyond_observed_sizes() {
        let mut t = StepTimes::default();
        assert_eq!(t.decode_time(3), None);
        // One size seen: proportional scaling is all there is.
        t.observe(2, 0, 0, Nanos::from_millis(40));
        assert!(t.decode_time(4).is_some_and(|s| (s - 0.08).abs() < 1e-9));
        // 30 ms + 5 ms a sequence.
        t = StepTimes::default();
        t.observe(1, 0, 0, Nanos::from_millis(35));
        t.observe(8, 0, 0, Nanos::from_millis(70));
        t.observe(16, 0, 0, Nanos::from_millis(110));
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
            t.observe(4, 0, 0, Nanos::from_millis(40));
            t.observe(4, 100, attended(0, 100), Nanos::from_millis(290));
            t.observe(0, 500, attended(0, 500), Nanos::from_millis(1250));
        }
        // Idle: 2.5 ms a token and no fixed cost (the fit's ridge keeps it ~2 % off).
        let idle = t.prefill_tokens_per_sec(0, 512, None).expect("learned");
        assert!((idle - 400.0).abs() < 20.0, "idle {idle}");
        // Four decodes and a 200 ms target: 64 tokens in the 160 ms the decodes leave.
        let busy = t
            .prefill_tokens_per_sec(4, 512, Some(Nanos::from_millis(200)))
            .expect("learned");
        assert!(busy < idle * 0.85, "busy {busy} vs idle {idle}");
        assert!(
            (busy / (64.0 / (0.04 + 64.0 * 0.0025)) - 1.0).abs() < 0.05,
            "busy {busy}"
        );
    }

    #[test]
    fn chunks_deep_in_a_prompt_cost_more_and_get_fewer_tokens() {
        // 3 ms a token plus 1 µs per KV token attended: what `examples/prefill_chunk`
        // measured on the CPU engine, roughly.
        let cost = |pos: u64, n: u64| 0.003 * n as f64 + 1e-6 * attended(pos, n) as f64;
        let mut t = StepTimes::default();
        for k in 0..40u64 {
            let (pos, n) = ((k * 256) % 3072, 64 + (k * 37) % 192);
            t.observe(0, n, attended(pos, n), Nanos::from_secs_f64(cost(pos, n)));
        }
        for (pos, n) in [(0, 100), (2900, 64)] {
            let p = t.prefill_time(pos, n).expect("learned");
            assert!((p / cost(pos, n) - 1.0).abs() < 0.02, "{pos}+{n}: {p}");
        }
        // 200 ms: ~63 tokens at the start of a prompt, ~34 at position 2,900.
        let near = t.prefill_fit(0.2, 0).expect("learned");
        let deep = t.prefill_fit(0.2, 2900).expect("learned");
        assert!((60..=66).contains(&near), "near {near}");
        assert!(cost(2900, deep) / 0.2 - 1.0 < 0.03, "deep {deep}");
        assert!(cost(2900, deep + 2) > 0.2, "deep {deep}");
        assert!(deep < near * 6 / 10, "near {near} deep {deep}");
    }
}
