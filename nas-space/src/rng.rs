//! A small seeded random number generator whose stream never changes between releases, so
//! that a seed recorded in a search journal reproduces the same cells forever, and one
//! recorded with a run the same split, shuffles, augmentations and built-in images.
//! It is the workspace's one generator: `nas-data` uses it as `DataRng`.
//!
//! xoshiro256++ (Blackman and Vigna), seeded through SplitMix64, written out here rather
//! than taken from `rand`, whose `StdRng` stream may change between versions.

/// Seeded generator for sampling and mutating cells, and for every random choice of the
/// data pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceRng {
    s: [u64; 4],
}

/// SplitMix64's increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (a 64-bit mixer).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SpaceRng {
    /// A generator for `seed`; equal seeds give equal streams on every platform.
    pub fn new(seed: u64) -> SpaceRng {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(GOLDEN);
            mix64(sm)
        };
        SpaceRng { s: [next(), next(), next(), next()] }
    }

    /// A generator for a point in a family of streams, e.g. `[stream, seed, epoch, index]`,
    /// so that an item's randomness depends on nothing but its coordinates (not on batching,
    /// thread count or order).
    ///
    /// Each word is folded into a running SplitMix64 hash, so different coordinate lists give
    /// unrelated streams. The hash starts from the bytes `nas-data`, where the derivation was
    /// first written; that start is part of the stable stream definition.
    pub fn derive(words: &[u64]) -> SpaceRng {
        let mut h: u64 = 0x6E61_732D_6461_7461; // "nas-data"
        for &w in words {
            h = mix64(h.wrapping_add(GOLDEN) ^ mix64(w.wrapping_add(GOLDEN)));
        }
        SpaceRng::new(h)
    }

    /// The generator's state, to save with a search and restore with [`SpaceRng::from_state`].
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restores a saved state. An all-zero state (never produced by `new`) is replaced
    /// by the state of seed 0.
    pub fn from_state(s: [u64; 4]) -> SpaceRng {
        if s == [0; 4] {
            return SpaceRng::new(0);
        }
        SpaceRng { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform integer in `0..n` (unbiased, Lemire's multiply-and-reject). Panics if `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "SpaceRng::below(0)");
        let n = n as u64;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= n.wrapping_neg() % n {
                return (m >> 64) as usize;
            }
        }
    }

    /// A uniform integer in `lo..=hi`. Panics if `lo > hi`.
    pub fn range_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "SpaceRng::range_inclusive({lo}, {hi})");
        lo + self.below((hi - lo) as usize + 1) as i64
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform float in `[0, 1)` with 24 random bits.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A uniform float in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit_f32()
    }

    /// `true` with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.unit_f64() < p
    }

    /// Shuffles `items` in place (Fisher-Yates, from the back).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}
