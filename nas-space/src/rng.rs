//! A small seeded random number generator whose stream never changes between releases,
//! so that a seed recorded in a search journal reproduces the same cells forever.
//!
//! xoshiro256++ (Blackman and Vigna), seeded through SplitMix64.

/// Seeded generator for sampling and mutating cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceRng {
    s: [u64; 4],
}

impl SpaceRng {
    /// A generator for `seed`; equal seeds give equal streams on every platform.
    pub fn new(seed: u64) -> SpaceRng {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        SpaceRng { s: [next(), next(), next(), next()] }
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

    /// A uniform integer in `0..n` (unbiased). Panics if `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "SpaceRng::below(0)");
        let n = n as u64;
        // Lemire's multiply-and-reject.
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as usize;
            }
        }
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
