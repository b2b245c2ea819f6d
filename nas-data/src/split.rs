//! The held-out validation split of a training set, chosen with a seed and recorded.
//!
//! NASNet's search holds out 5,000 random images of CIFAR-10's 50,000 training images as the
//! controller's validation set (45,000 remain for training), so a child's reward never touches the
//! test set (paper §A.1). A [`Split`] lists both index sets with the seed that
//! chose them; a run writes it to its run directory as JSON and can reload it to prove which images
//! the rewards were measured on.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::rng::{stream, DataRng};
use crate::{DataError, Dataset, InMemory, Subset};

/// Which items of a training set train the child and which measure its reward.
///
/// Both index lists are sorted, disjoint and together cover `0..total`.
/// The choice is a function of `(total, valid.len(), seed)` only and stable forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Format version of the JSON form.
    pub version: u32,
    /// The seed that chose the validation items.
    pub seed: u64,
    /// The size of the set that was split.
    pub total: usize,
    /// Indices of the training items, ascending.
    pub train: Vec<usize>,
    /// Indices of the held-out validation items, ascending.
    pub valid: Vec<usize>,
}

impl Split {
    /// The paper's held-out count: 5,000 of CIFAR-10's 50,000 training images.
    pub const PAPER_VALID: usize = 5_000;

    /// Holds out `n_valid` items of `total`, chosen uniformly with `seed`.
    pub fn holdout(total: usize, n_valid: usize, seed: u64) -> Result<Split, DataError> {
        if n_valid > total {
            return Err(DataError::Split(format!("cannot hold out {n_valid} of {total} items")));
        }
        let mut order: Vec<usize> = (0..total).collect();
        let mut rng = DataRng::derive(&[stream::SPLIT, seed, total as u64]);
        // Partial Fisher-Yates: the first n_valid positions become a uniform sample.
        for i in 0..n_valid {
            let j = i + rng.below(total - i);
            order.swap(i, j);
        }
        let mut valid = order[..n_valid].to_vec();
        valid.sort_unstable();
        let mut is_valid = vec![false; total];
        for &i in &valid {
            is_valid[i] = true;
        }
        let train = (0..total).filter(|&i| !is_valid[i]).collect();
        Ok(Split { version: 1, seed, total, train, valid })
    }

    /// The paper's split: [`Split::PAPER_VALID`] items held out (45,000 / 5,000 on CIFAR-10).
    pub fn paper(total: usize, seed: u64) -> Result<Split, DataError> {
        Split::holdout(total, Split::PAPER_VALID, seed)
    }

    /// Holds out `fraction` of the items (rounded), e.g. 0.1 for the paper's proportion on a smaller set.
    pub fn fraction(total: usize, fraction: f64, seed: u64) -> Result<Split, DataError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(DataError::Split(format!("validation fraction {fraction} is outside [0, 1]")));
        }
        Split::holdout(total, (total as f64 * fraction).round() as usize, seed)
    }

    /// Checks the invariants (a reloaded file may have been edited): known version, sorted
    /// lists, no overlap, every index below `total` and every index present.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.version != 1 {
            return Err(DataError::Split(format!(
                "format version {} is not supported (this build reads version 1)",
                self.version
            )));
        }
        let mut seen = vec![false; self.total];
        for (name, list) in [("train", &self.train), ("valid", &self.valid)] {
            if list.windows(2).any(|w| w[0] >= w[1]) {
                return Err(DataError::Split(format!("{name} indices are not strictly ascending")));
            }
            for &i in list.iter() {
                if i >= self.total {
                    return Err(DataError::Split(format!("{name} index {i} is not below the total {}", self.total)));
                }
                if seen[i] {
                    return Err(DataError::Split(format!("index {i} is in both train and valid")));
                }
                seen[i] = true;
            }
        }
        if let Some(missing) = seen.iter().position(|&s| !s) {
            return Err(DataError::Split(format!("index {missing} is in neither train nor valid")));
        }
        Ok(())
    }

    /// The JSON form (pretty-printed).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a split always serialises")
    }

    /// Parses and validates the JSON form.
    pub fn from_json(text: &str) -> Result<Split, DataError> {
        let split: Split =
            serde_json::from_str(text).map_err(|e| DataError::Split(format!("cannot parse split JSON: {e}")))?;
        split.validate()?;
        Ok(split)
    }

    /// Writes the JSON form to `path`, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), DataError> {
        Ok(nas_space::files::write_atomic(path.as_ref(), self.to_json() + "\n")?)
    }

    /// Reads and validates a split written by [`Split::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Split, DataError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                DataError::Missing { path: path.to_path_buf(), what: "a split JSON file".to_string() }
            }
            _ => DataError::io(path, e),
        })?;
        let split: Split =
            serde_json::from_str(&text).map_err(|source| DataError::Json { path: path.to_path_buf(), source })?;
        split.validate().map_err(|err| DataError::Layout { path: path.to_path_buf(), reason: err.to_string() })?;
        Ok(split)
    }

    fn check_len(&self, len: usize) -> Result<(), DataError> {
        if len != self.total {
            return Err(DataError::Split(format!("split made for {} items applied to a set of {len}", self.total)));
        }
        Ok(())
    }

    /// Views of the training and validation parts of `set`, without copying.
    pub fn apply<D: Dataset>(&self, set: Arc<D>) -> Result<(Subset<D>, Subset<D>), DataError> {
        self.check_len(set.len())?;
        Ok((Subset::new(set.clone(), self.train.clone())?, Subset::new(set, self.valid.clone())?))
    }

    /// Copies of the training and validation parts of an in-memory set.
    pub fn apply_in_memory(&self, set: &InMemory) -> Result<(InMemory, InMemory), DataError> {
        self.check_len(set.len())?;
        Ok((set.select(&self.train), set.select(&self.valid)))
    }
}
