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
#[error("unknown mock profile {0:?}: use `instant`, `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]` or a named profile (cpu:smollm2-135m, h100:llama2-70b, a100:llama2-70b), optionally followed by `,fail-every=N`")]
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

/// A modelled accelerator running one model: its step times and capacity, from
/// `data/profiles.toml` (each entry cites its measurements and its fit error).
#[derive(Clone, Debug, PartialEq)]
pub struct Accelerator {
    pub profile: StepProfile,
    pub kv_tokens: u64,
    pub slots: u32,
    pub usd_per_hour: f64,
}

#[derive(serde::Deserialize)]
struct ProfileFile {
    profiles: std::collections::BTreeMap<String, ProfileEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileEntry {
    base_ms: f64,
    per_token_us: f64,
    per_seq_us: f64,
    kv_tokens: u64,
    slots: u32,
    usd_per_hour: f64,
}

const PROFILES: &str = include_str!("../data/profiles.toml");

/// The named profiles (`cpu:smollm2-135m`, `h100:llama2-70b`, ...).
pub fn accelerators() -> std::collections::BTreeMap<String, Accelerator> {
    let file: ProfileFile = match toml::from_str(PROFILES) {
        Ok(f) => f,
        Err(_) => return Default::default(), // checked by a test
    };
    file.profiles
        .into_iter()
        .map(|(name, e)| {
            let acc = Accelerator {
                profile: StepProfile {
                    base: Nanos::from_secs_f64(e.base_ms / 1e3),
                    per_token: Nanos::from_secs_f64(e.per_token_us / 1e6),
                    per_seq: Nanos::from_secs_f64(e.per_seq_us / 1e6),
                },
                kv_tokens: e.kv_tokens,
                slots: e.slots,
                usd_per_hour: e.usd_per_hour,
            };
            (name, acc)
        })
        .collect()
}

impl StepProfile {
    /// `instant` (no time at all), `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]`, or a named
    /// profile from `data/profiles.toml` (e.g. `h100:llama2-70b`).
    pub fn parse(s: &str) -> Result<StepProfile, ProfileError> {
        if s == "instant" {
            return Ok(StepProfile::default());
        }
        if let Some(a) = accelerators().get(s) {
            return Ok(a.profile);
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
    #[test]
    fn the_profile_file_parses_and_names_resolve() {
        let all = super::accelerators();
        assert!(all.len() >= 3, "{:?}", all.keys());
        let h100 = super::StepProfile::parse("h100:llama2-70b").expect("named");
        assert_eq!(h100, all["h100:llama2-70b"].profile);
        assert!(h100.step_time(1, 1).0 > 28_000_000);
    }

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
