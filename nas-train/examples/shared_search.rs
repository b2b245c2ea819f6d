//! A shared-weight search on the built-in data, one JSON line per epoch (for measuring
//! whether the search learns; `nas_train::shared`).
//!
//! ```text
//! cargo run --release -p nas-train --example shared_search -- STRATEGY SEED [EPOCHS]
//! ```
//!
//! `SHARED_LR` sets the shared weights' learning rate, `SHARED_CLIP` their global-norm clip, `SHARED_ENAS=1` searches ENAS's five
//! ops, `SHARED_PER_INPUT=1` keys an op's weights by the state it reads (ENAS).

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
    config.enas_ops = std::env::var("SHARED_ENAS").is_ok_and(|v| v == "1");
    config.per_input_weights = std::env::var("SHARED_PER_INPUT").is_ok_and(|v| v == "1");
    let result = search(&config, &Device::Cpu, &mut |r| {
        let line = serde_json::json!({
            "epoch": r.epoch,
            "shared_loss": r.shared_loss,
            "shared_top1": r.shared_top1,
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
