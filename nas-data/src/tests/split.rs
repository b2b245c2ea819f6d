use std::sync::Arc;

use super::TempDir;
use crate::*;

#[test]
fn paper_split_is_45000_5000_sorted_disjoint_and_complete() {
    let split = Split::paper(50_000, 1).unwrap();
    assert_eq!((split.train.len(), split.valid.len()), (45_000, 5_000));
    assert!(split.train.windows(2).all(|w| w[0] < w[1]));
    assert!(split.valid.windows(2).all(|w| w[0] < w[1]));
    let mut all: Vec<usize> = split.train.iter().chain(&split.valid).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..50_000).collect::<Vec<_>>());
    split.validate().unwrap();
    // Spread over the whole set, not a block.
    assert!(split.valid[0] < 100 && *split.valid.last().unwrap() > 49_900);
}

#[test]
fn split_is_a_function_of_the_seed() {
    let a = Split::holdout(1000, 100, 7).unwrap();
    assert_eq!(a, Split::holdout(1000, 100, 7).unwrap());
    let b = Split::holdout(1000, 100, 8).unwrap();
    assert_ne!(a.valid, b.valid);
    let overlap = a.valid.iter().filter(|i| b.valid.contains(i)).count();
    assert!(overlap < 40, "seeds 7 and 8 share {overlap} of 100 validation items");
    // Pinned: a recorded seed must choose the same items in every release.
    assert_eq!(a.valid[..5], GOLDEN_VALID);
}

const GOLDEN_VALID: [usize; 5] = [9, 11, 30, 38, 41];

#[test]
fn fraction_and_edge_sizes() {
    let s = Split::fraction(200, 0.1, 3).unwrap();
    assert_eq!((s.train.len(), s.valid.len()), (180, 20));
    assert_eq!(Split::holdout(5, 5, 0).unwrap().train, Vec::<usize>::new());
    assert_eq!(Split::holdout(5, 0, 0).unwrap().train, vec![0, 1, 2, 3, 4]);
    let err = Split::holdout(10, 11, 0).unwrap_err();
    assert_eq!(err.to_string(), "invalid split: cannot hold out 11 of 10 items");
    assert!(Split::fraction(10, 1.5, 0).is_err());
}

#[test]
fn json_round_trip_and_file() {
    let split = Split::holdout(300, 30, 42).unwrap();
    let json = split.to_json();
    assert!(json.contains("\"seed\": 42"), "{json}");
    assert_eq!(Split::from_json(&json).unwrap(), split);
    let tmp = TempDir::new("split");
    let path = tmp.path().join("split.json");
    split.save(&path).unwrap();
    assert_eq!(Split::load(&path).unwrap(), split);
    let err = Split::load(tmp.path().join("nope.json")).unwrap_err();
    assert!(err.to_string().contains("nope.json: not found"), "{err}");
    let mut newer = split.clone();
    newer.version = 2;
    std::fs::write(&path, newer.to_json()).unwrap();
    let err = Split::load(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: ", path.display()))
            && err.contains("format version 2 is not supported (this build reads version 1)"),
        "{err}"
    );
    std::fs::write(&path, "{ not json").unwrap();
    let err = Split::load(&path).unwrap_err();
    assert!(err.to_string().starts_with(&format!("{}: ", path.display())), "{err}");
}

#[test]
fn validate_rejects_edited_splits() {
    let good = Split::holdout(10, 3, 0).unwrap();
    let mut overlap = good.clone();
    overlap.train.push(overlap.valid[0]);
    overlap.train.sort_unstable();
    assert!(overlap.validate().unwrap_err().to_string().contains("in both train and valid"));
    let mut missing = good.clone();
    missing.train.pop();
    assert!(missing.validate().unwrap_err().to_string().contains("in neither"));
    let mut unsorted = good.clone();
    unsorted.train.reverse();
    assert!(unsorted.validate().unwrap_err().to_string().contains("not strictly ascending"));
    let mut out_of_range = good.clone();
    out_of_range.total = 9;
    assert!(out_of_range.validate().is_err());
    let mut version = good.clone();
    version.version = 2;
    assert!(Split::from_json(&version.to_json()).is_err());
}

#[test]
fn apply_selects_the_recorded_items() {
    let set = SyntheticConfig::new(5).generate(Part::Train, 50);
    let split = Split::holdout(50, 10, 9).unwrap();
    let (train, valid) = split.apply(Arc::new(set.clone())).unwrap();
    assert_eq!((train.len(), valid.len()), (40, 10));
    for (k, &i) in split.valid.iter().enumerate() {
        assert_eq!(valid.label(k), set.labels()[i]);
        assert_eq!(*valid.get(k).unwrap().image, set.images()[i]);
    }
    let (train_copy, valid_copy) = split.apply_in_memory(&set).unwrap();
    assert_eq!(train_copy.len(), 40);
    assert_eq!(valid_copy.image(3), set.image(split.valid[3]));
    let err = Split::holdout(49, 10, 9).unwrap().apply(Arc::new(set)).unwrap_err();
    assert_eq!(err.to_string(), "invalid split: split made for 49 items applied to a set of 50");
}
