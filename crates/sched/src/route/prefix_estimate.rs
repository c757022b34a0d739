//! The router's per-worker estimate of which prompt blocks a worker holds (`route.rs`).

use rustc_hash::FxHashMap;
use std::collections::VecDeque;

/// Which prompt blocks one worker is estimated to hold: the blocks of requests sent to it,
/// least recently sent forgotten first once `capacity` is reached (its cache evicts too).
#[derive(Debug)]
pub(super) struct PrefixEstimate {
    capacity: usize,
    tick: u64,
    /// Block hash → tick of its last touch.
    last: FxHashMap<u64, u64>,
    /// Touches in tick order; an entry is stale once its block was touched again
    /// (lazy deletion: no ordered-map update per touch).
    touches: VecDeque<(u64, u64)>,
}

impl PrefixEstimate {
    pub(super) fn new(capacity: usize) -> Self {
        PrefixEstimate {
            capacity,
            tick: 0,
            last: FxHashMap::default(),
            touches: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.last.len()
    }

    /// Leading blocks present. The estimate is prefix-closed (see [`touch`](Self::touch)),
    /// so presence along a prompt's chain is true then false: a binary search finds the
    /// boundary in log(n) lookups, each a likely cache miss on a large fleet.
    pub(super) fn matched(&self, blocks: &[u64]) -> u32 {
        blocks.partition_point(|h| self.last.contains_key(h)) as u32
    }

    /// Record that a prompt's blocks (a chain from its first block) were sent. They are
    /// touched last block first, so every block is always more recent than the blocks
    /// after it on any chain: eviction takes tails before heads, as a real prefix cache
    /// does, and what is left is prefix-closed.
    pub(super) fn touch(&mut self, blocks: &[u64]) {
        for &h in blocks.iter().rev() {
            self.tick += 1;
            self.last.insert(h, self.tick);
            self.touches.push_back((self.tick, h));
        }
        // Forget the least recently touched blocks beyond capacity.
        while self.last.len() > self.capacity {
            let Some((t, h)) = self.touches.pop_front() else {
                break;
            };
            if self.last.get(&h) == Some(&t) {
                self.last.remove(&h);
            }
        }
        // Drop stale touches once they outnumber live ones, keeping memory bounded.
        if self.touches.len() > self.last.len() + self.last.len() / 2 + 64 {
            let last = &self.last;
            self.touches.retain(|(t, h)| last.get(h) == Some(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::fnv1a;

    #[test]
    fn the_estimate_forgets_least_recent_blocks_first() {
        let mut p = PrefixEstimate::new(3);
        p.touch(&[1, 2, 3]);
        p.touch(&[4]);
        p.touch(&[5]);
        assert_eq!(p.matched(&[1, 2, 3]), 1, "the tail goes first");
        assert_eq!(p.matched(&[4]), 1);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn the_estimate_stays_prefix_closed_so_binary_search_matches_a_linear_walk() {
        // Prompts drawn from a tree of shared prefixes, through a small LRU.
        let mut p = PrefixEstimate::new(40);
        let mut x = 11u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let chain = |path: &[u64]| -> Vec<u64> {
            let mut h = crate::kv::FNV_OFFSET;
            path.iter()
                .map(|b| {
                    h = fnv1a(h, &b.to_le_bytes());
                    h
                })
                .collect()
        };
        for _ in 0..3_000 {
            let path: Vec<u64> = (0..1 + next() % 12).map(|_| next() % 3).collect();
            let blocks = chain(&path);
            let linear = blocks.iter().take_while(|h| p.last.contains_key(h)).count() as u32;
            assert_eq!(p.matched(&blocks), linear, "{path:?}");
            if next() % 2 == 0 {
                p.touch(&blocks);
            }
        }
    }

    #[test]
    fn the_estimate_is_exactly_lru_under_repeated_touches() {
        // Against a plain model: the `cap` most recently touched distinct blocks.
        let cap = 50;
        let mut p = PrefixEstimate::new(cap);
        let mut order: Vec<u64> = Vec::new();
        let mut x = 7u64;
        for _ in 0..5_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let h = (x >> 33) % 80;
            p.touch(&[h]);
            order.retain(|&o| o != h);
            order.push(h);
            if order.len() > cap {
                order.remove(0);
            }
            assert_eq!(p.len(), order.len());
        }
        for h in 0..80 {
            assert_eq!(p.matched(&[h]) == 1, order.contains(&h), "block {h}");
        }
        assert!(
            p.touches.len() <= cap + cap / 2 + 64 + 1,
            "stale touches are dropped"
        );
    }
}
