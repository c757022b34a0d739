use serde::{Deserialize, Serialize};
use std::ops::{Add, AddAssign, Sub};

/// A count of tokens.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Tokens(pub u64);

/// A duration or an instant on some clock, in nanoseconds. The clock is always passed in;
/// nothing in the pure crates reads the wall clock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(pub u64);

/// Money in billionths of a US dollar. Never `f64` for money.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NanoUsd(pub u64);

macro_rules! unit_ops {
    ($t:ident) => {
        impl Add for $t {
            type Output = $t;
            fn add(self, o: $t) -> $t {
                $t(self.0.saturating_add(o.0))
            }
        }
        impl AddAssign for $t {
            fn add_assign(&mut self, o: $t) {
                self.0 = self.0.saturating_add(o.0);
            }
        }
        impl Sub for $t {
            type Output = $t;
            /// Saturating: a unit never goes negative.
            fn sub(self, o: $t) -> $t {
                $t(self.0.saturating_sub(o.0))
            }
        }
    };
}
unit_ops!(Tokens);
unit_ops!(Nanos);
unit_ops!(NanoUsd);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    pub fn from_millis(ms: u64) -> Self {
        Nanos(ms.saturating_mul(1_000_000))
    }
    pub fn from_secs_f64(s: f64) -> Self {
        Nanos((s.max(0.0) * 1e9) as u64)
    }
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
    pub fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }
}

impl From<std::time::Duration> for Nanos {
    fn from(d: std::time::Duration) -> Self {
        Nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl From<Nanos> for std::time::Duration {
    fn from(n: Nanos) -> Self {
        std::time::Duration::from_nanos(n.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_saturate_instead_of_wrapping() {
        assert_eq!(Tokens(3) - Tokens(5), Tokens(0));
        assert_eq!(Nanos(u64::MAX) + Nanos(1), Nanos(u64::MAX));
        assert_eq!(Nanos::from_millis(2).as_millis(), 2);
    }
}
