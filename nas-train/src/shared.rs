//! Weight sharing's search (ENAS, Pham et al. 2018) in the NASNet space: the shared weights
//! of a [`SuperNet`] and a strategy trained in turns.
//!
//! Each epoch has two phases:
//! - **A, the shared weights**: one pass over the training images; each minibatch trains
//!   the child of a cell freshly drawn from the strategy ([`nas_controller::Strategy::sample`]: the
//!   controller's policy, uniform cells for random search), with the child recipe's SGD and
//!   a cosine decay over the whole search;
//! - **B, the strategy**: `rewards_per_epoch` proposals, each rewarded with the top-1
//!   accuracy of its child, with the shared weights, on one batch of held-out images
//!   (shuffled, not augmented). Batch norm normalises with the batch's statistics, as ENAS
//!   does (the store's moving averages mix every child), and no dropout or drop path
//!   applies.
//!
//! A reward costs one forward pass of a small child instead of a child's training, so the
//! controller makes many updates on one machine. [`SharedTrainer`] is the two phases' step;
//! [`search`] runs the loop and reports each epoch's health ([`EpochReport`]).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device};
use nas_controller::{new_strategy, StrategyConfig};
use nas_data::{Batch, BatchConfig, Batcher};
use nas_ops::supernet::{Sharing, SuperNet};
use nas_space::{CellSpec, NetworkConfig, SearchSpace};
use serde::{Deserialize, Serialize};

use crate::data::{DataSource, RunData};
use crate::eval::top_k_hits;
use crate::optim::{Optimizer, ParamGroups};
use crate::recipe::{ClassifierInit, Recipe};
use crate::trainer::{train_step_of, StepMetrics, TrainConfig};
use crate::TrainError;

/// The shared weights and their optimiser: phase A's step and phase B's reward.
pub struct SharedTrainer {
    supernet: SuperNet,
    /// The same store, children without dropout or drop path.
    scorer: SuperNet,
    optimizer: Optimizer,
    config: TrainConfig,
    step: u64,
}

impl std::fmt::Debug for SharedTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTrainer").field("supernet", &self.supernet).field("step", &self.step).finish()
    }
}

impl SharedTrainer {
    /// A super-net of `space` in `network`, initialised from `config.seed`.
    pub fn new(
        space: &SearchSpace,
        network: &NetworkConfig,
        sharing: Sharing,
        config: TrainConfig,
        device: &Device,
    ) -> Result<SharedTrainer, TrainError> {
        config.validate()?;
        let supernet = SuperNet::new(space, network, sharing, config.seed, DType::F32, device)?;
        let optimizer = Optimizer::new(config.optim, &ParamGroups::from_varmap(supernet.store()))?;
        let scorer = supernet.without_dropout();
        Ok(SharedTrainer { supernet, scorer, optimizer, config, step: 0 })
    }

    /// The super-net.
    pub fn supernet(&self) -> &SuperNet {
        &self.supernet
    }

    /// Steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// One step of the shared weights on `batch` through the child of `spec` (only its
    /// path's weights get a gradient and an update).
    pub fn train_step(&mut self, spec: &CellSpec, batch: &Batch) -> Result<StepMetrics, TrainError> {
        let net = self.supernet.child(spec, self.config.seed.wrapping_add(self.step))?;
        let metrics = train_step_of(&net, batch, &self.config, self.step, &mut self.optimizer)?;
        self.step += 1;
        Ok(metrics)
    }

    /// The top-1 accuracy on `batch` of the child of `spec` with the shared weights (batch
    /// statistics, no dropout, no gradient).
    pub fn reward(&self, spec: &CellSpec, batch: &Batch) -> Result<f64, TrainError> {
        let net = self.scorer.child(spec, 0)?;
        let out = nas_ops::no_grad(|| net.forward_t(&batch.images, true))?;
        let (top1, _) = top_k_hits(&out.logits, &batch.labels)?;
        Ok(top1 as f64 / batch.labels.dim(0)? as f64)
    }
}

/// A shared-weight search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedConfig {
    /// What proposes cells.
    pub strategy: StrategyConfig,
    /// B, blocks per cell.
    pub num_blocks: usize,
    /// The ops searched: the paper's 13 (`false`) or ENAS's 5 (`true`); add is the only
    /// combine either way.
    pub enas_ops: bool,
    /// The ops searched, when not one of the two named sets.
    #[serde(default)]
    pub ops: Option<Vec<nas_space::Op>>,
    /// One set of weights per state an op reads (ENAS's keying) instead of one per shape
    /// (`nas_ops::supernet::Sharing`).
    #[serde(default)]
    pub per_input_weights: bool,
    /// The images.
    pub data: DataSource,
    /// The child recipe: the skeleton (its dropout and drop path apply in phase A only), the
    /// batch, the learning rate (cosine over the whole search), the optimiser, the
    /// augmentation and the held-out split.
    pub child: Recipe,
    /// Epochs of the two phases.
    pub epochs: u64,
    /// Proposals rewarded per epoch.
    pub rewards_per_epoch: usize,
    /// Held-out images per reward.
    pub reward_batch: usize,
    /// Every random draw.
    pub seed: u64,
}

impl SharedConfig {
    /// A search on the built-in data: the small search child ([`Recipe::small_search_child`]:
    /// N = 2, F = 4, batch 32, lr 0.1) on 2,400 images (a fifth held out), 10 epochs of 60
    /// steps, 100 rewards per epoch on 64 held-out images each (five controller batches).
    pub fn small(strategy: StrategyConfig, seed: u64) -> SharedConfig {
        SharedConfig {
            strategy,
            num_blocks: 5,
            enas_ops: false,
            ops: None,
            per_input_weights: false,
            data: DataSource::synthetic(2400),
            child: Recipe {
                eval: crate::data::EvalSplit::Holdout { fraction: 0.2, seed },
                ..Recipe::small_search_child(seed)
            },
            epochs: 10,
            rewards_per_epoch: 100,
            reward_batch: 64,
            seed,
        }
    }

    /// The searched space.
    pub fn space(&self) -> SearchSpace {
        let mut space = if self.enas_ops { SearchSpace::enas() } else { SearchSpace::nasnet() };
        if let Some(ops) = &self.ops {
            space.ops = ops.clone();
        }
        SearchSpace { num_blocks: self.num_blocks, ..space.add_only() }
    }
}

/// One epoch of a shared-weight search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: u64,
    /// Phase A's mean loss and top-1 on the training batches.
    pub shared_loss: f64,
    pub shared_top1: f64,
    /// Phase A's median global gradient norm (before clipping).
    pub shared_grad_norm: f64,
    /// Phase B's rewards, in order.
    pub rewards: Vec<f64>,
    /// Their mean.
    pub mean_reward: f64,
    /// The strategy's statistics after the epoch (the controller's entropy and baseline).
    pub strategy: serde_json::Value,
    /// How often each op was proposed in phase B.
    pub op_counts: BTreeMap<String, usize>,
    /// The best proposal so far: its reward and cell.
    pub best_reward: f64,
    pub best: CellSpec,
    /// Seconds of each phase.
    pub seconds_a: f64,
    pub seconds_b: f64,
}

/// Runs `config` on `device`, calling `on_epoch` after each epoch; returns every epoch's
/// report.
pub fn search(
    config: &SharedConfig,
    device: &Device,
    on_epoch: &mut (dyn FnMut(&EpochReport) + Send),
) -> Result<Vec<EpochReport>, TrainError> {
    crate::on_pool(|| search_here(config, device, on_epoch))
}

fn search_here(
    config: &SharedConfig,
    device: &Device,
    on_epoch: &mut (dyn FnMut(&EpochReport) + Send),
) -> Result<Vec<EpochReport>, TrainError> {
    let recipe = &config.child;
    recipe.validate()?;
    if config.rewards_per_epoch == 0 || config.reward_batch == 0 || config.epochs == 0 {
        return Err(TrainError::Config {
            field: "rewards_per_epoch",
            message: "epochs, rewards per epoch and the reward batch must be at least 1".into(),
        });
    }
    let space = config.space();
    let data = RunData::open(&config.data, recipe.eval, recipe.augment, recipe.cutout, 32)?;
    let mut network = recipe.network.clone();
    network.num_classes = data.num_classes();
    network.image_size = 32;
    let train_batches = data.train_batcher(recipe.batch_size, config.seed.wrapping_add(0x5EED), device)?;
    let reward_batches = Batcher::new(
        data.eval.clone(),
        data.eval_transform.clone(),
        BatchConfig {
            drop_last: data.eval.len() >= config.reward_batch,
            ..BatchConfig::train(config.reward_batch, config.seed)
        },
        device.clone(),
    )?;
    let steps_per_epoch = train_batches.batches_per_epoch() as u64;
    let total_steps = (config.epochs * steps_per_epoch).max(1);
    // No weight average: the shared weights are never evaluated as one network.
    let train = TrainConfig { ema_decay: None, ..recipe.train_config(total_steps, steps_per_epoch, config.seed) };
    let sharing = if config.per_input_weights { Sharing::PerInput } else { Sharing::PerShape };
    let mut trainer = SharedTrainer::new(&space, &network, sharing, train, device)?;
    if recipe.classifier_init == ClassifierInit::FanIn {
        nas_ops::init::rescale_classifiers_fan_in(trainer.supernet().store())?;
    }
    let ctl = |err: nas_controller::ControllerError| TrainError::Config { field: "strategy", message: err.to_string() };
    let mut strategy = new_strategy(&config.strategy, &space, config.seed).map_err(ctl)?;
    let mut reports = Vec::new();
    let mut best: Option<(f64, CellSpec)> = None;
    let mut reward_epoch = 0;
    let mut reward_iter = reward_batches.epoch(reward_epoch);
    for epoch in 0..config.epochs {
        // Phase A.
        let started = Instant::now();
        let cells = strategy.sample(steps_per_epoch as usize).map_err(ctl)?;
        let (mut loss, mut top1, mut n) = (0.0, 0.0, 0.0f64);
        let mut norms = Vec::with_capacity(cells.len());
        for (batch, spec) in train_batches.epoch(epoch).zip(&cells) {
            let m = trainer.train_step(spec, &batch?)?;
            (loss, top1, n) = (loss + m.loss, top1 + m.top1, n + 1.0);
            norms.push(m.grad_norm);
        }
        norms.sort_by(f64::total_cmp);
        let seconds_a = started.elapsed().as_secs_f64();
        // Phase B.
        let started = Instant::now();
        let mut rewards = Vec::with_capacity(config.rewards_per_epoch);
        let mut op_counts = BTreeMap::new();
        while rewards.len() < config.rewards_per_epoch {
            let proposals = strategy.propose(config.rewards_per_epoch - rewards.len()).map_err(ctl)?;
            if proposals.is_empty() {
                return Err(TrainError::Config {
                    field: "strategy",
                    message: "proposed nothing with no reward outstanding".into(),
                });
            }
            for p in proposals {
                let batch = match reward_iter.next() {
                    Some(batch) => batch?,
                    None => {
                        reward_epoch += 1;
                        reward_iter = reward_batches.epoch(reward_epoch);
                        reward_iter.next().expect("a held-out batch")?
                    }
                };
                let reward = trainer.reward(&p.spec, &batch)?;
                let ops = [&p.spec.normal, &p.spec.reduction].into_iter().flat_map(|c| &c.blocks).flat_map(|b| b.ops);
                for op in ops {
                    *op_counts.entry(op.name().to_string()).or_insert(0) += 1;
                }
                if best.as_ref().is_none_or(|(r, _)| reward > *r) {
                    best = Some((reward, p.spec.clone()));
                }
                strategy.report(p.id, Some(reward)).map_err(ctl)?;
                rewards.push(reward);
            }
        }
        let (best_reward, best_cell) = best.clone().expect("at least one reward");
        let report = EpochReport {
            epoch: epoch + 1,
            shared_loss: loss / n.max(1.0),
            shared_top1: top1 / n.max(1.0),
            shared_grad_norm: norms.get(norms.len() / 2).copied().unwrap_or(0.0),
            mean_reward: rewards.iter().sum::<f64>() / rewards.len() as f64,
            rewards,
            strategy: strategy.stats(),
            op_counts,
            best_reward,
            best: best_cell,
            seconds_a,
            seconds_b: started.elapsed().as_secs_f64(),
        };
        on_epoch(&report);
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny shared search runs both phases with each strategy: every epoch trains the
    /// shared weights (finite loss) and rewards the asked number of proposals on held-out
    /// batches; the same seed gives the same rewards.
    #[test]
    fn a_tiny_shared_search_runs_both_phases() {
        for strategy in ["ppo", "random"] {
            let mut config = SharedConfig::small(strategy.parse().unwrap(), 1);
            config.data = DataSource::synthetic(160);
            config.child.network.n = 1;
            config.epochs = 2;
            config.rewards_per_epoch = 7;
            config.reward_batch = 8;
            config.enas_ops = true;
            let mut seen = 0;
            let reports = search(&config, &Device::Cpu, &mut |r| {
                seen += 1;
                assert_eq!(r.epoch, seen);
            })
            .unwrap();
            assert_eq!(reports.len(), 2);
            for r in &reports {
                assert!(r.shared_loss.is_finite() && r.shared_loss > 0.0, "{r:?}");
                assert_eq!(r.rewards.len(), 7);
                assert!(r.rewards.iter().all(|x| (0.0..=1.0).contains(x)));
                assert_eq!(r.op_counts.values().sum::<usize>(), 7 * 2 * 5 * 2);
                assert!(r.op_counts.keys().all(|op| SearchSpace::enas().ops.iter().any(|o| o.name() == op)));
            }
            let again = search(&config, &Device::Cpu, &mut |_| {}).unwrap();
            assert_eq!(again[1].rewards, reports[1].rewards, "{strategy}");
        }
    }

    /// Phase A lowers the loss of a fixed child trained through the super-net.
    #[test]
    fn shared_steps_fit_a_batch() {
        let space = SearchSpace::enas();
        let mut network = NetworkConfig::cifar();
        (network.n, network.num_conv_filters, network.image_size, network.num_classes) = (1, 4, 16, 3);
        network.use_aux_head = false;
        let recipe = Recipe::small_search_child(0);
        let train = TrainConfig {
            total_steps: 30,
            schedule: crate::schedule::LrSchedule::Constant { lr: 0.05 },
            optim: recipe.optim,
            label_smoothing: 0.0,
            aux_weight: 0.0,
            seed: 3,
            ema_decay: None,
        };
        let mut trainer = SharedTrainer::new(&space, &network, Sharing::PerInput, train, &Device::Cpu).unwrap();
        let spec = space.sample(&mut nas_space::SpaceRng::new(4));
        let images = crate::bench::uniform_tensor((8, 3, 16, 16), 5, &Device::Cpu).unwrap();
        let labels = candle_core::Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1], &Device::Cpu).unwrap();
        let batch = Batch { images, labels, indices: (0..8).collect(), skipped: 0 };
        let first = trainer.train_step(&spec, &batch).unwrap().loss;
        let mut last = first;
        for _ in 0..25 {
            last = trainer.train_step(&spec, &batch).unwrap().loss;
        }
        assert!(last < 0.5 * first, "loss {first} -> {last}");
        assert_eq!(trainer.step(), 26);
        assert!(trainer.reward(&spec, &batch).unwrap() > 0.5);
    }
}
