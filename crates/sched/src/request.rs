pub use tokenfab_types::Band;
use tokenfab_types::{Nanos, RequestId, TenantId, Tokens};

/// Latency targets a request asks for. Absent targets impose nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slo {
    /// Time to first token.
    pub ttft: Option<Nanos>,
    /// Time per output token after the first.
    pub tpot: Option<Nanos>,
}

/// What the core needs to know about a request. Token contents stay with the driver; the
/// core reasons in counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedRequest {
    pub id: RequestId,
    pub tenant: TenantId,
    pub band: Band,
    /// Fair-share weight of the tenant (≥ 1): a tenant of weight 2 gets twice the service
    /// of a tenant of weight 1 when both are backlogged.
    pub weight: u32,
    pub prompt: Tokens,
    pub max_new: Tokens,
    pub arrival: Nanos,
    pub slo: Slo,
    /// Chain hashes of the prompt's full KV blocks in its cache scope
    /// ([`crate::prefix_hashes`]); empty disables prefix reuse for this request.
    pub block_hashes: Vec<u64>,
}

impl SchedRequest {
    /// Earliest-deadline-first key within a tenant: the TTFT deadline when one is set,
    /// otherwise arrival order.
    pub fn deadline(&self) -> Nanos {
        match self.slo.ttft {
            Some(t) => self.arrival + t,
            None => Nanos(u64::MAX / 2) + self.arrival,
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// max_new tokens reached.
    Length,
    /// The driver cancelled it (client gone, stop string matched, shutdown).
    Cancelled,
}
