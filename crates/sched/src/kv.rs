/// One fixed-size block of KV cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Fixed-size KV blocks with refcounts and a free list. The executor's own cache (llama.cpp
/// cells) is sized to `total * block_tokens`; this pool is the single source of truth for
/// how much of it is promised to whom.
#[derive(Clone, Debug)]
pub struct BlockPool {
    block_tokens: u32,
    refs: Vec<u32>,
    free: Vec<BlockId>,
}

impl BlockPool {
    pub fn new(total_blocks: u32, block_tokens: u32) -> Self {
        BlockPool {
            block_tokens: block_tokens.max(1),
            refs: vec![0; total_blocks as usize],
            // Pop from the end: lowest ids first, for readable traces.
            free: (0..total_blocks).rev().map(BlockId).collect(),
        }
    }

    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    pub fn total(&self) -> u32 {
        self.refs.len() as u32
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn used_count(&self) -> u32 {
        self.total() - self.free_count()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: u64) -> u32 {
        tokens.div_ceil(u64::from(self.block_tokens)) as u32
    }

    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        self.refs[b.0 as usize] = 1;
        Some(b)
    }

    /// Drop one reference; the block returns to the free list when none remain.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b.0 as usize];
        debug_assert!(*r > 0, "release of a free block {b:?}");
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.free.push(b);
        }
    }

    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refs[b.0 as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_round_trip() {
        let mut p = BlockPool::new(3, 16);
        let a = p.allocate().expect("free block");
        let b = p.allocate().expect("free block");
        assert_eq!(p.free_count(), 1);
        p.release(a);
        p.release(b);
        assert_eq!(p.free_count(), 3);
        assert_eq!(p.blocks_for(0), 0);
        assert_eq!(p.blocks_for(16), 1);
        assert_eq!(p.blocks_for(17), 2);
    }
}
