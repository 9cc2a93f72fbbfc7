//! A fast, non-cryptographic hasher for maps keyed by numbers this crate
//! assigns itself (slot and tag numbers).
//!
//! Why: std's SipHash resists hash flooding, which matters for keys an
//! outsider chooses (tag text, names) and costs ~20 ns per lookup, which
//! matters on the selection hot path. Keys here are small integers the
//! registry hands out, so an outsider cannot pick colliding ones; this is
//! the multiply-rotate hash rustc uses (FxHash), a few lines, no dependency.

use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(buf));
        }
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn maps_work_and_spread() {
        let mut m: HashMap<u32, u32, FxBuild> = HashMap::default();
        for i in 0..10_000 {
            m.insert(i, i * 2);
        }
        assert!((0..10_000).all(|i| m.get(&i) == Some(&(i * 2))));
        let h = |i: u32| {
            let mut h = FxHasher::default();
            h.write_u32(i);
            h.finish()
        };
        // consecutive keys land in different top bits (hashbrown uses the top 7)
        let tops: std::collections::HashSet<u64> = (0..128).map(|i| h(i) >> 57).collect();
        assert!(tops.len() > 60, "{}", tops.len());
    }
}
