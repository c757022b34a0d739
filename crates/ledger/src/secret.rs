//! API key secrets: generation, parsing and constant-time verification.
//!
//! A key reads `tfk-<id>-<secret>`: `id` is 12 hex digits (public, the lookup handle) and
//! `secret` 64 hex digits (256 random bits). Only SHA-256(secret) is stored; a presented
//! key is looked up by id and its hash compared in constant time, so response timing
//! says nothing about how much of a guess was right.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "tfk-";

/// A freshly made key: the text shown once to the user, and what is stored.
pub struct NewSecret {
    pub id: String,
    pub text: String,
    pub hash: [u8; 32],
}

pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new key for a new id.
pub fn generate(rng: &mut impl RngCore) -> NewSecret {
    let mut id = [0u8; 6];
    rng.fill_bytes(&mut id);
    regenerate(&hex::encode(id), rng)
}

/// A new secret for an existing id (`keys rotate`).
pub fn regenerate(id: &str, rng: &mut impl RngCore) -> NewSecret {
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    NewSecret {
        id: id.to_owned(),
        text: format!("{PREFIX}{id}-{secret}"),
        hash: hash(&secret),
    }
}

/// Split a presented key into (id, secret); `None` if it is not shaped like one of ours.
pub fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexy(id, 12) && hexy(secret, 64)).then_some((id, secret))
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub fn verify(secret: &str, stored: &[u8; 32]) -> bool {
    hash(secret).ct_eq(stored).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn generated_keys_parse_and_verify() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let k = generate(&mut rng);
        let (id, secret) = parse(&k.text).expect("well-formed");
        assert_eq!(id, k.id);
        assert!(verify(secret, &k.hash));
        let other = regenerate(&k.id, &mut rng);
        assert_ne!(other.text, k.text);
        assert!(!verify(secret, &other.hash));
        for bad in [
            "",
            "tfk-",
            "sk-abc",
            "tfk-zz-00",
            &k.text[..k.text.len() - 1],
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
