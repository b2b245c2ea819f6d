//! What a program that imports `nas-train`, without the `nas` command line, gets: the
//! command line's default search child and its built-in transfer, runnable as they are.

use std::path::PathBuf;

use candle_core::Device;
use nas_space::{CellSpec, Op};
use nas_train::data::{Augment, DataSource};
use nas_train::recipe::{ClassifierInit, Recipe};
use nas_train::run::{self, RunConfig, RunOptions, Silent};
use nas_train::search::{self, LocalExecutor, SearchConfig, SearchReporter};
use nas_train::transfer::{self, TransferData, TransferOptions};

/// A fresh directory under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nas-train-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Quiet;
impl SearchReporter for Quiet {}

/// One child of the default search, on less data for one step: it trains and its reward is
/// journaled.
#[test]
fn the_default_search_child_trains_without_the_command_line() {
    let dir = TempDir::new("search");
    let defaults = SearchConfig::default();
    defaults.validate().unwrap();
    assert_eq!(defaults.child, Recipe::small_search_child(defaults.seed));
    assert_eq!(
        (defaults.strategy.name(), defaults.children, defaults.data.to_string()),
        ("ppo", 40, "synthetic:2000".into())
    );
    assert_eq!(defaults.baseline_random, 5);
    let config = SearchConfig {
        children: 1,
        workers: 1,
        data: DataSource::synthetic(64),
        child: Recipe { epochs: 1, ..defaults.child.clone() },
        baseline_random: 0,
        ..defaults
    };
    let outcome = search::search(&dir.0.join("ppo"), &config, &mut LocalExecutor::threads(), None, &mut Quiet).unwrap();
    assert!(outcome.complete);
    assert!(outcome.summary.failed.is_empty(), "{:?}", outcome.summary.failed);
    assert_eq!(outcome.summary.results.len(), 1);
    let reward = outcome.summary.results[0].reward;
    assert!((0.0..=1.0).contains(&reward), "{reward}");
}

/// The built-in transfer: the data written as JPEGs, the recipe the command line trains, and
/// one step of it.
#[test]
fn the_builtin_transfer_is_prepared_and_trains_without_the_command_line() {
    let dir = TempDir::new("transfer");
    let root = dir.0.join("data");
    let options = TransferOptions {
        data: TransferData::Builtin { root: root.clone(), per_class: 2 },
        ..TransferOptions::builtin(&root)
    };
    let spec = CellSpec::nasnet_a();
    let prepared = transfer::prepare(&spec, &options).unwrap();
    let written = prepared.builtin_dir.clone().expect("the built-in data was written");
    assert!(written.starts_with(&root) && written.join("train").is_dir() && written.join("val").is_dir());
    let recipe = &prepared.recipe;
    let network = &recipe.network;
    assert_eq!((network.n, network.num_conv_filters, network.image_size), (2, 16, transfer::BUILTIN_IMAGE_SIZE));
    assert_eq!((network.num_classes, network.use_aux_head, network.bn_decay), (10, false, transfer::BUILTIN_BN_DECAY));
    assert_eq!((recipe.augment, recipe.classifier_init, recipe.epochs), (Augment::Light, ClassifierInit::FanIn, 12));
    assert_eq!((recipe.optim, recipe.lr), (Recipe::imagenet_mobile().optim, Recipe::imagenet_mobile().lr));
    // Prepared again, the folder is reused and nothing changes.
    assert_eq!(transfer::prepare(&spec, &options).unwrap(), prepared);

    // A costlier cell in the same skeleton trains for fewer epochs.
    let mut heavy = CellSpec::nasnet_a();
    for block in &mut heavy.normal.blocks {
        block.ops = [Op::Conv3x3, Op::Conv3x3];
    }
    let epochs = transfer::builtin_epochs(&heavy, network);
    assert!((3..12).contains(&epochs), "{epochs}");

    let config = RunConfig {
        cell_spec: spec,
        recipe: Recipe { max_steps: Some(1), batch_size: 4, ..recipe.clone() },
        data: prepared.data.clone(),
        seed: 0,
        init: None,
    };
    let options = RunOptions { force_memory: false, stop: None, device: Device::Cpu };
    let report = run::train(&dir.0.join("run"), &config, &options, &mut Silent).unwrap();
    assert_eq!(report.steps, 1);
    assert_eq!(report.final_eval.metrics.images, 20, "two validation images per class");
}
