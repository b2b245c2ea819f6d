//! A small seeded random number generator whose stream never changes between releases,
//! so a recorded seed reproduces the same split, the same shuffles and the same augmentations forever.
//!
//! The generator is xoshiro256++ (Blackman and Vigna) seeded through SplitMix64, written out here
//! rather than taken from `rand`, whose `StdRng` stream may change between versions.
//! Independent streams for each purpose (split, shuffle, augmentation of one item, generation of one
//! synthetic image) come from [`DataRng::derive`], which hashes the seed together with the stream's
//! coordinates, so an item's randomness does not depend on batching, thread count or order.

/// Seeded generator used for every random choice in the crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRng {
    s: [u64; 4],
}

/// SplitMix64's output function (a 64-bit mixer).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The purposes that get their own streams. Values are part of the stable stream definition.
pub(crate) mod stream {
    pub const SPLIT: u64 = 1;
    pub const SHUFFLE: u64 = 2;
    pub const AUGMENT: u64 = 3;
    pub const SYNTHETIC: u64 = 4;
}

impl DataRng {
    /// A generator for `seed`; equal seeds give equal streams on every platform.
    pub fn new(seed: u64) -> DataRng {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(GOLDEN);
            mix64(sm)
        };
        DataRng { s: [next(), next(), next(), next()] }
    }

    /// A generator for a point in a family of streams, e.g. `[stream, seed, epoch, index]`.
    ///
    /// Each word is folded into a running SplitMix64 hash, so different coordinate lists give
    /// unrelated streams and the result depends on nothing but the words.
    pub fn derive(words: &[u64]) -> DataRng {
        let mut h: u64 = 0x6E61_732D_6461_7461; // "nas-data"
        for &w in words {
            h = mix64(h.wrapping_add(GOLDEN) ^ mix64(w.wrapping_add(GOLDEN)));
        }
        DataRng::new(h)
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
        assert!(n > 0, "DataRng::below(0)");
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
        assert!(lo <= hi, "DataRng::range_inclusive({lo}, {hi})");
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
