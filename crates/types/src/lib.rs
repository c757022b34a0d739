//! Ids, units and the closed [`ErrorCode`] set shared by every tokenfab crate.
//!
//! Units live in types (`Tokens`, `Nanos`, `NanoUsd`) so that a token count can never be
//! added to a duration by mistake. This crate depends on nothing of ours and on no runtime.

mod band;
mod error;
mod home;
mod ids;
mod units;

pub use band::Band;
pub use error::{ErrorCode, ErrorOrigin};
pub use home::home;
pub use ids::{RequestId, SeqSlot, TenantId, TokenId};
pub use units::{NanoUsd, Nanos, Tokens};
