//! A shared-weight search on the built-in data, one JSON line per epoch (for measuring
//! whether the search learns; `nas_train::shared`).
//!
//! ```text
//! cargo run --release -p nas-train --example shared_search -- STRATEGY SEED [EPOCHS]
//! ```
//!
//! Environment overrides of `SharedConfig::small`:
//! - `SHARED_LR`, `SHARED_CLIP`, `SHARED_WD`: the shared weights' learning rate, global-norm
//!   clip and weight decay; `SHARED_RMSPROP=EPS`: RMSProp instead of momentum;
//! - `SHARED_F`, `SHARED_N`, `SHARED_BATCH`, `SHARED_IMAGES`: the child's width, cells per
//!   stage, batch and the built-in images;
//! - `SHARED_ENAS=1`: ENAS's five ops; `SHARED_OPS=op,op,…`: any op list;
//! - `SHARED_PER_INPUT=1`: an op's weights keyed by the state it reads (ENAS).

use candle_core::Device;
use nas_train::shared::{search, SharedConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(strategy), Some(seed)) = (args.first(), args.get(1).and_then(|s| s.parse().ok())) else {
        eprintln!("usage: shared_search STRATEGY SEED [EPOCHS]");
        std::process::exit(2);
    };
    let strategy = strategy.parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let mut config = SharedConfig::small(strategy, seed);
    if let Some(epochs) = args.get(2).and_then(|s| s.parse().ok()) {
        config.epochs = epochs;
    }
    if let Some(lr) = std::env::var("SHARED_LR").ok().and_then(|s| s.parse().ok()) {
        config.child.lr = lr;
    }
    if let Some(clip) = std::env::var("SHARED_CLIP").ok().and_then(|s| s.parse().ok()) {
        config.child.optim.clip_global_norm = Some(clip);
    }
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<f64>().ok());
    if let Some(f) = env("SHARED_F") {
        config.child.network.num_conv_filters = f as usize;
    }
    if let Some(n) = env("SHARED_N") {
        config.child.network.n = n as usize;
    }
    if let Some(n) = env("SHARED_IMAGES") {
        config.data = nas_train::data::DataSource::synthetic(n as usize);
    }
    if let Some(b) = env("SHARED_BATCH") {
        config.child.batch_size = b as usize;
    }
    if let Some(eps) = env("SHARED_RMSPROP") {
        config.child.optim.optimizer =
            nas_train::optim::OptimizerConfig::RmsProp { decay: 0.9, momentum: 0.9, epsilon: eps };
    }
    if let Some(wd) = env("SHARED_WD") {
        config.child.optim.weight_decay = wd;
    }
    if let Ok(ops) = std::env::var("SHARED_OPS") {
        config.ops = Some(ops.split(',').map(|o| o.parse().expect("an op")).collect());
    }
    config.enas_ops = std::env::var("SHARED_ENAS").is_ok_and(|v| v == "1");
    config.per_input_weights = std::env::var("SHARED_PER_INPUT").is_ok_and(|v| v == "1");
    let result = search(&config, &Device::Cpu, &mut |r| {
        let line = serde_json::json!({
            "epoch": r.epoch,
            "shared_loss": r.shared_loss,
            "shared_top1": r.shared_top1,
            "shared_grad_norm": r.shared_grad_norm,
            "mean_reward": r.mean_reward,
            "best_reward": r.best_reward,
            "strategy": r.strategy,
            "op_counts": r.op_counts,
            "seconds_a": r.seconds_a,
            "seconds_b": r.seconds_b,
        });
        println!("{line}");
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
