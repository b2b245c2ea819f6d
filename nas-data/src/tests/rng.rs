use crate::DataRng;

#[test]
fn stream_is_pinned() {
    // Golden values: changing them breaks every recorded split, shuffle and built-in set.
    let mut rng = DataRng::new(0);
    let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
    assert_eq!(first, GOLDEN_SEED_0);
    let mut derived = DataRng::derive(&[1, 2, 3]);
    assert_eq!(derived.next_u64(), GOLDEN_DERIVED_1_2_3);
}

// xoshiro256++ seeded by SplitMix64 from 0; the SplitMix64 states start 0xe220a8397b1dcdaf, as in the
// reference C code, and these three outputs were checked with an independent Python transcription.
const GOLDEN_SEED_0: [u64; 3] = [5987356902031041503, 7051070477665621255, 6633766593972829180];
const GOLDEN_DERIVED_1_2_3: u64 = 7683849166982483302;

#[test]
fn derive_depends_on_every_word_and_their_order() {
    let a = DataRng::derive(&[1, 2, 3]).next_u64();
    assert_eq!(a, DataRng::derive(&[1, 2, 3]).next_u64());
    assert_ne!(a, DataRng::derive(&[1, 2, 4]).next_u64());
    assert_ne!(a, DataRng::derive(&[3, 2, 1]).next_u64());
    assert_ne!(a, DataRng::derive(&[1, 2, 3, 0]).next_u64());
    assert_ne!(DataRng::derive(&[0]).next_u64(), DataRng::derive(&[]).next_u64());
}

#[test]
fn below_is_in_range_and_roughly_uniform() {
    let mut rng = DataRng::new(9);
    let mut counts = [0usize; 7];
    for _ in 0..7000 {
        counts[rng.below(7)] += 1;
    }
    assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    for _ in 0..1000 {
        let v = rng.range_inclusive(-3, 3);
        assert!((-3..=3).contains(&v));
        let u = rng.unit_f32();
        assert!((0.0..1.0).contains(&u));
        let f = rng.uniform(2.0, 5.0);
        assert!((2.0..5.0).contains(&f));
    }
}

#[test]
fn shuffle_is_a_permutation_and_moves_items() {
    let mut rng = DataRng::new(4);
    let mut items: Vec<usize> = (0..100).collect();
    rng.shuffle(&mut items);
    assert_ne!(items, (0..100).collect::<Vec<_>>());
    items.sort_unstable();
    assert_eq!(items, (0..100).collect::<Vec<_>>());
}
