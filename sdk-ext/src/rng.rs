//! Randomness, injected. Policy code takes `&mut impl Rng`; the wasm adapter seeds a fast
//! generator from the host's entropy (WASI `random_get`), tests seed it with a constant.

pub trait Rng {
    fn next_u64(&mut self) -> u64;
}

/// wyrand: tiny, fast, good statistical quality for sampling decisions (not for secrets).
#[derive(Debug, Clone)]
pub struct WyRand {
    state: u64,
}

impl WyRand {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Seed from the host's entropy: std's `RandomState` draws its keys from the platform
    /// source (WASI `random_get` on wasm32-wasip1), so hashing with it gives a seed without
    /// another dependency.
    pub fn from_entropy() -> Self {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x9E37_79B9_7F4A_7C15);
        Self::new(h.finish())
    }
}

impl Rng for WyRand {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }
}

/// A scripted sequence, for table tests: returns the given values in order, then repeats.
#[derive(Debug, Clone)]
pub struct Sequence {
    values: Vec<u64>,
    next: usize,
}

impl Sequence {
    pub fn new(values: Vec<u64>) -> Self {
        Self { values, next: 0 }
    }
}

impl Rng for Sequence {
    fn next_u64(&mut self) -> u64 {
        let v = self.values.get(self.next % self.values.len().max(1)).copied().unwrap_or(0);
        self.next += 1;
        v
    }
}
