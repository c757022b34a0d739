//! An executor that models an accelerator's timing instead of running kernels.

use crate::profile::{MockSpec, StepShape};
use tokenfab_engine::{BatchEntry, ExecError, Executor, ExecutorCapacity, Sampled, SamplingParams};
use tokenfab_types::{SeqSlot, TokenId};

/// Placeholder tokens (`a`..`z` by position) after the profile's step time, slept in real
/// time: the engine loop, scheduler and everything in front of them behave as with a real
/// accelerator of that speed. It never ends a generation itself (`max_tokens` does). With
/// `fail_every`, every N-th step fails instead (fault injection).
pub struct ModelExecutor {
    spec: MockSpec,
    capacity: ExecutorCapacity,
    steps: u64,
}

impl ModelExecutor {
    pub fn new(spec: MockSpec, capacity: ExecutorCapacity) -> Self {
        ModelExecutor {
            spec,
            capacity,
            steps: 0,
        }
    }
}

impl Executor for ModelExecutor {
    fn capacity(&self) -> ExecutorCapacity {
        self.capacity
    }

    fn release(&mut self, _slot: SeqSlot) {}

    fn begin(&mut self, _slot: SeqSlot, _params: &SamplingParams) {}

    fn copy_prefix(&mut self, _from: SeqSlot, _to: SeqSlot, _tokens: u64) {}

    fn trim(&mut self, _slot: SeqSlot, _from: u64) {}

    fn run(&mut self, batch: &[BatchEntry<'_>]) -> Result<Vec<Sampled>, ExecError> {
        let shape = StepShape::of_batch(self.capacity.fast_prefill_rows, batch);
        let t = self.spec.profile.step_time(&shape);
        if t.0 > 0 {
            std::thread::sleep(t.into());
        }
        self.steps += 1;
        if self
            .spec
            .fail_every
            .is_some_and(|n| self.steps.is_multiple_of(n))
        {
            return Err(ExecError::Failed(format!(
                "injected failure at step {}",
                self.steps
            )));
        }
        Ok(batch
            .iter()
            .filter(|e| e.sample)
            .map(|e| {
                let pos = e.pos + e.tokens.len() as u64;
                Sampled {
                    token: TokenId(i32::from(b'a') + (pos % 26) as i32),
                    eog: false,
                }
            })
            .collect())
    }
}
