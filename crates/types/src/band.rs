use serde::{Deserialize, Serialize};

/// Strict priority bands: a waiting request of a higher band is always scheduled before
/// any of a lower band, and lower bands are shed and preempted first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Band {
    Interactive = 0,
    Standard = 1,
    Batch = 2,
}

impl Band {
    pub const ALL: [Band; 3] = [Band::Interactive, Band::Standard, Band::Batch];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Band::Interactive => "interactive",
            Band::Standard => "standard",
            Band::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Band> {
        Band::ALL.into_iter().find(|b| b.as_str() == s)
    }
}
