//! KV blocks: a fixed pool with per-block holders (the sequence slots whose KV includes
//! the block), a free list, and a prefix index from chain hashes of block contents to
//! blocks, salted by cache scope so equal prefixes of different tenants never match.

use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use tokenfab_types::{SeqSlot, TokenId};

/// One fixed-size block of KV cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

#[derive(Clone, Debug, Default)]
struct Block {
    /// Slots whose sequence includes this block; the refcount is its length. Inline for
    /// the usual one or two holders: no second memory access per allocation.
    holders: SmallVec<[SeqSlot; 2]>,
    /// Chain hash of the block's contents, when it is in the prefix index.
    hash: Option<u64>,
    /// Who allocated it (a tenant's index, see the scheduler's quotas): its KV is
    /// charged to them until the block is free again, whoever shares it meanwhile.
    owner: u32,
}

/// The block pool and the prefix index over it. The executor's own cache (llama.cpp cells)
/// is sized to `total * block_tokens`; this pool is the single source of truth for how much
/// of it is promised to whom.
#[derive(Clone, Debug)]
pub struct BlockPool {
    block_tokens: u32,
    total: u32,
    /// Blocks handed out at least once (ids `0..blocks.len()`); the rest of the pool is
    /// untouched and costs no memory, so a simulated 1,000-GPU fleet holds only the KV
    /// its load reached, not every device's capacity.
    blocks: Vec<Block>,
    /// Released blocks, reused last-in first-out before untouched ones.
    free: Vec<BlockId>,
    /// Keys are already chain hashes: a cheap hasher is enough.
    index: FxHashMap<u64, BlockId>,
    /// Blocks in use per owner.
    owned: Vec<u32>,
}

impl BlockPool {
    pub fn new(total_blocks: u32, block_tokens: u32) -> Self {
        BlockPool {
            block_tokens: block_tokens.max(1),
            total: total_blocks,
            blocks: Vec::new(),
            free: Vec::new(),
            index: FxHashMap::default(),
            owned: Vec::new(),
        }
    }

    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32 + (self.total - self.blocks.len() as u32)
    }

    pub fn used_count(&self) -> u32 {
        self.total() - self.free_count()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: u64) -> u32 {
        tokens.div_ceil(u64::from(self.block_tokens)) as u32
    }

    /// Take a free block for `slot`, charged to `owner`.
    pub fn allocate(&mut self, slot: SeqSlot, owner: u32) -> Option<BlockId> {
        // Lowest ids first, for readable traces.
        let b = match self.free.pop() {
            Some(b) => b,
            None if (self.blocks.len() as u32) < self.total => {
                self.blocks.push(Block::default());
                BlockId(self.blocks.len() as u32 - 1)
            }
            None => return None,
        };
        let block = &mut self.blocks[b.0 as usize];
        block.holders.push(slot);
        block.owner = owner;
        let o = owner as usize;
        if self.owned.len() <= o {
            self.owned.resize(o + 1, 0);
        }
        self.owned[o] += 1;
        Some(b)
    }

    /// Blocks in use that `owner` allocated.
    pub fn owned(&self, owner: u32) -> u32 {
        self.owned.get(owner as usize).copied().unwrap_or(0)
    }

    /// Who a block in use is charged to.
    pub fn owner(&self, b: BlockId) -> u32 {
        self.blocks[b.0 as usize].owner
    }

    /// Add `slot` as a holder of an existing block (prefix sharing).
    pub fn share(&mut self, b: BlockId, slot: SeqSlot) {
        debug_assert!(
            !self.blocks[b.0 as usize].holders.is_empty(),
            "share of free {b:?}"
        );
        debug_assert!(
            !self.blocks[b.0 as usize].holders.contains(&slot),
            "{slot:?} already holds {b:?}"
        );
        self.blocks[b.0 as usize].holders.push(slot);
    }

    /// `slot` lets go of `b`; the block returns to the free list (and leaves the prefix
    /// index) when no holder remains.
    pub fn release(&mut self, b: BlockId, slot: SeqSlot) {
        let block = &mut self.blocks[b.0 as usize];
        let Some(i) = block.holders.iter().position(|s| *s == slot) else {
            debug_assert!(false, "{slot:?} does not hold {b:?}");
            return;
        };
        block.holders.swap_remove(i);
        if block.holders.is_empty() {
            if let Some(h) = block.hash.take() {
                if self.index.get(&h) == Some(&b) {
                    self.index.remove(&h);
                }
            }
            self.owned[block.owner as usize] -= 1;
            self.free.push(b);
        }
    }

    pub fn refcount(&self, b: BlockId) -> u32 {
        self.holders(b).len() as u32
    }

    pub fn holders(&self, b: BlockId) -> &[SeqSlot] {
        self.blocks.get(b.0 as usize).map_or(&[], |b| &b.holders)
    }

    /// Enter a computed block into the prefix index under `hash`. When another block
    /// already has that hash, the index keeps the first.
    pub fn register(&mut self, b: BlockId, hash: u64) {
        let block = &mut self.blocks[b.0 as usize];
        if block.hash.is_some() || block.holders.is_empty() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.index.entry(hash) {
            e.insert(b);
            block.hash = Some(hash);
        }
    }

    pub fn is_indexed(&self, b: BlockId) -> bool {
        self.blocks
            .get(b.0 as usize)
            .is_some_and(|b| b.hash.is_some())
    }

    /// The longest run of `hashes` (from the first) present in the index.
    pub fn lookup(&self, hashes: &[u64]) -> Vec<BlockId> {
        hashes
            .iter()
            .map_while(|h| self.index.get(h).copied())
            .collect()
    }

    /// How many leading blocks of `hashes` are cached: `lookup(hashes).len()` without
    /// collecting them.
    pub fn cached_len(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count()
    }
}

/// FNV-1a over little-endian bytes: deterministic across processes and platforms (the
/// same prompt must map to the same hashes in the router, the engine and the simulator).
pub(crate) fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Chain hashes of the full blocks of `tokens`: hash *k* covers the scope and every token
/// of blocks 0..=k, so equal hashes mean equal prefixes within the same scope.
pub fn prefix_hashes(scope: &str, tokens: &[TokenId], block_tokens: u32) -> Vec<u64> {
    let mut h = fnv1a(FNV_OFFSET, scope.as_bytes());
    h = fnv1a(h, &[0xff]);
    tokens
        .chunks_exact(block_tokens.max(1) as usize)
        .map(|block| {
            for t in block {
                h = fnv1a(h, &t.0.to_le_bytes());
            }
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_share_release_round_trip() {
        let mut p = BlockPool::new(3, 16);
        let (s0, s1) = (SeqSlot(0), SeqSlot(1));
        let a = p.allocate(s0, 0).expect("free block");
        assert_eq!(p.owned(0), 1);
        p.register(a, 42);
        p.share(a, s1);
        assert_eq!(p.refcount(a), 2);
        assert_eq!(p.lookup(&[42, 7]), vec![a]);
        p.release(a, s0);
        assert_eq!(p.lookup(&[42]), vec![a], "still held by s1");
        p.release(a, s1);
        assert_eq!(p.free_count(), 3);
        assert_eq!(p.owned(0), 0);
        assert!(p.lookup(&[42]).is_empty(), "freed blocks leave the index");
        assert_eq!(p.blocks_for(17), 2);
    }

    #[test]
    fn hashes_chain_and_are_salted_by_scope() {
        let toks: Vec<TokenId> = (0..40).map(TokenId).collect();
        let a = prefix_hashes("tenant:a", &toks, 16);
        assert_eq!(a.len(), 2, "only full blocks");
        let b = prefix_hashes("tenant:b", &toks, 16);
        assert!(
            a.iter().all(|h| !b.contains(h)),
            "scopes never share hashes"
        );
        let mut other = toks.clone();
        other[0] = TokenId(999);
        let c = prefix_hashes("tenant:a", &other, 16);
        assert_ne!(a[1], c[1], "a change in block 0 changes every later hash");
    }
}
