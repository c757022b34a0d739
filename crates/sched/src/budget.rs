//! What one step of the plan can still take: batch tokens and predicted seconds of
//! prefill, spent chunk by chunk as the planner (`plan.rs`) fills the step.

use crate::timing::StepTimes;

/// What one step can still take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepBudget {
    /// Tokens the step's batch can still take.
    pub tokens: u64,
    /// Predicted seconds of prefill left within the target step time, while sequences
    /// decode under one; `None`: limited by `tokens` only.
    pub secs: Option<f64>,
    /// Prefill tokens the step gets whatever `secs` says, so that prefill always moves.
    pub floor: u64,
}

impl StepBudget {
    /// Whether any prefill may still join the step.
    pub fn open(&self) -> bool {
        self.tokens > 0 && (self.floor > 0 || self.secs.is_none_or(|s| s > 0.0))
    }

    /// Tokens of a prefill chunk starting at `pos` that fit what is left (all of
    /// `tokens` until `times` has seen enough steps to say).
    pub fn fits(&self, times: &StepTimes, pos: u64) -> u64 {
        match self.secs {
            None => self.tokens,
            Some(secs) => {
                let in_time = times.prefill_fit(secs, pos).unwrap_or(u64::MAX);
                self.tokens.min(in_time.max(self.floor))
            }
        }
    }

    /// Take a chunk of `n` tokens starting at `pos` off what is left. Returns whether
    /// the chunk is predicted to take longer than the seconds that were left (the floor
    /// paid for the rest).
    pub fn charge(&mut self, times: &StepTimes, pos: u64, n: u64) -> bool {
        self.tokens -= n;
        self.floor = self.floor.saturating_sub(n);
        let Some(secs) = &mut self.secs else {
            return false;
        };
        let cost = times.prefill_time(pos, n).unwrap_or(0.0);
        let over = cost > *secs;
        *secs = (*secs - cost).max(0.0);
        over
    }

    /// Half of what is left (for one admission pass).
    pub fn half(&self) -> StepBudget {
        StepBudget {
            tokens: self.tokens / 2,
            secs: self.secs.map(|s| s / 2.0),
            floor: self.floor / 2,
        }
    }

    /// Take off what a pass spent of the part it was given (`before` → `after`). A pass
    /// can end with more tokens than it began with (a preempted sequence's work goes back
    /// to its budget): that comes back here too.
    pub fn spend(&mut self, before: StepBudget, after: StepBudget) {
        self.tokens = (self.tokens + after.tokens).saturating_sub(before.tokens);
        self.floor = self.floor.saturating_sub(before.floor - after.floor);
        if let (Some(s), Some(b), Some(a)) = (&mut self.secs, before.secs, after.secs) {
            *s = (*s - (b - a)).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StepBudget;

    #[test]
    fn a_pass_spends_from_the_step_what_it_used_of_its_part() {
        let mut step = StepBudget {
            tokens: 400,
            secs: Some(0.2),
            floor: 16,
        };
        let mut half = step.half();
        let before = half;
        half.tokens -= 150;
        half.secs = Some(0.02);
        half.floor = 0;
        step.spend(before, half);
        assert_eq!(step.tokens, 250);
        assert!(step.secs.is_some_and(|s| (s - 0.12).abs() < 1e-12));
        assert_eq!(step.floor, 8);

        // A preempted sequence's work comes back to the pass: the step gets it back.
        let mut part = step.half();
        let before = part;
        part.tokens += 40;
        step.spend(before, part);
        assert_eq!(step.tokens, 290);
    }
}
