//! The scheduling core: which request runs next, how many prompt tokens each step
//! prefills, which KV blocks a sequence holds, when to preempt and when to shed load.
//!
//! Pure and deterministic: every decision is a function of the scheduler's state, the
//! time passed in (`now: Nanos`) and the input. No I/O, no async, no threads, no wall
//! clock, no randomness. The engine (real llama.cpp), the simulator (virtual clock) and
//! the fleet router all drive this same code; if a change here wants tokio, a socket or
//! `Instant::now()`, it belongs in a driver instead.

mod admit;
mod budget;
mod cache;
mod kv;
mod plan;
mod queue;
mod quota;
mod request;
pub mod route;
mod scheduler;
mod share;
mod step;
mod timing;

pub use admit::Rejection;
pub use kv::{prefix_hashes, BlockId, BlockPool};
pub use queue::WaitQueue;
pub use quota::KvQuota;
pub use request::{Band, FinishReason, SchedRequest, Slo};
pub use scheduler::{Ended, SchedConfig, SchedSnapshot, SchedStats, Scheduler};
pub use step::{PrefixCopy, StepPlan, StepResult, Work};
pub use timing::StepTimes;
