//! A step-time profile: how long one batch takes on the modelled accelerator.

use tokenfab_types::Nanos;

/// Linear step time: `base + per_token × tokens in the batch + per_seq × sequences`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepProfile {
    pub base: Nanos,
    pub per_token: Nanos,
    pub per_seq: Nanos,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown mock profile {0:?}: use `instant` or `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]`, optionally followed by `,fail-every=N`")]
pub struct ProfileError(pub String);

/// What `--mock` runs: a step-time profile and, for fault-injection tests, a step that
/// fails every `fail_every` steps (as a crashed kernel or lost device would).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MockSpec {
    pub profile: StepProfile,
    pub fail_every: Option<u64>,
}

impl MockSpec {
    /// `PROFILE[,fail-every=N]`, e.g. `linear:2:50,fail-every=9`.
    pub fn parse(s: &str) -> Result<MockSpec, ProfileError> {
        let mut parts = s.split(',');
        let profile = StepProfile::parse(parts.next().unwrap_or_default())?;
        let mut spec = MockSpec {
            profile,
            fail_every: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("fail-every", n)) => {
                    let n = n.parse::<u64>().ok().filter(|n| *n > 0);
                    spec.fail_every = Some(n.ok_or_else(|| ProfileError(s.to_owned()))?);
                }
                _ => return Err(ProfileError(s.to_owned())),
            }
        }
        Ok(spec)
    }
}

impl StepProfile {
    /// `instant` (no time at all) or `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]`.
    pub fn parse(s: &str) -> Result<StepProfile, ProfileError> {
        if s == "instant" {
            return Ok(StepProfile::default());
        }
        let err = || ProfileError(s.to_owned());
        let rest = s.strip_prefix("linear:").ok_or_else(err)?;
        let nums: Vec<f64> = rest
            .split(':')
            .map(|p| p.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0))
            .collect::<Option<_>>()
            .ok_or_else(err)?;
        match nums.as_slice() {
            [base_ms, tok_us] | [base_ms, tok_us, _] => Ok(StepProfile {
                base: Nanos::from_secs_f64(base_ms / 1e3),
                per_token: Nanos::from_secs_f64(tok_us / 1e6),
                per_seq: Nanos::from_secs_f64(nums.get(2).copied().unwrap_or(0.0) / 1e6),
            }),
            _ => Err(err()),
        }
    }

    pub fn step_time(&self, tokens: u64, seqs: u64) -> Nanos {
        Nanos(
            self.base.0
                + self.per_token.0.saturating_mul(tokens)
                + self.per_seq.0.saturating_mul(seqs),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse() {
        assert_eq!(StepProfile::parse("instant"), Ok(StepProfile::default()));
        let p = StepProfile::parse("linear:10:50:200").expect("valid");
        assert_eq!(p.step_time(100, 2), Nanos(10_000_000 + 5_000_000 + 400_000));
        assert!(StepProfile::parse("h100").is_err());
        assert!(StepProfile::parse("linear:-1:2").is_err());
        let m = MockSpec::parse("linear:1:2,fail-every=9").expect("valid");
        assert_eq!((m.profile.base, m.fail_every), (Nanos(1_000_000), Some(9)));
        assert_eq!(MockSpec::parse("instant"), Ok(MockSpec::default()));
        assert!(MockSpec::parse("instant,fail-every=0").is_err());
        assert!(MockSpec::parse("instant,explode").is_err());
    }
}
