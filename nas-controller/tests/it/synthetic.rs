//! The synthetic objective: the reward of a cell is the fraction of its 50 decisions equal to
//! those of a hidden target cell. Learning strategies must beat random search on it with the
//! same seeds and the same budget.

use nas_controller::{new_strategy, EvolutionConfig, PpoConfig, Strategy, StrategyConfig};
use nas_space::{SearchSpace, SpaceRng};

/// Proposals per run: 25 controller batches of 20.
const BUDGET: usize = 500;
const SEEDS: [u64; 3] = [1, 2, 3];

fn similarity(actions: &[usize], target: &[usize]) -> f64 {
    actions.iter().zip(target).filter(|(a, b)| a == b).count() as f64 / target.len() as f64
}

/// Runs `strategy` for `BUDGET` proposals, 20 at a time as a pool of 20 workers would, and
/// returns the rewards in id order.
fn run(strategy: &mut dyn Strategy, target: &[usize]) -> Vec<f64> {
    let mut rewards = Vec::with_capacity(BUDGET);
    while rewards.len() < BUDGET {
        let batch = strategy.propose(20.min(BUDGET - rewards.len())).unwrap();
        assert!(!batch.is_empty(), "{} stalled with nothing outstanding", strategy.name());
        for p in batch {
            assert_eq!(p.id as usize, rewards.len());
            let r = similarity(&p.actions, target);
            strategy.report(p.id, Some(r)).unwrap();
            rewards.push(r);
        }
    }
    rewards
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The strategies compared, in the order of the table below.
fn configs() -> Vec<StrategyConfig> {
    // The paper's learning rate (0.00035) barely moves the policy in 25 batches, and the
    // paper's baseline decay (0.95 per batch) lags a reward that rises this fast, so this
    // test uses lr 0.03 and decay 0.5; every other field is the paper's default.
    let policy = PpoConfig { learning_rate: 0.03, baseline_decay: 0.5, ..PpoConfig::default() };
    vec![
        StrategyConfig::Random,
        StrategyConfig::Ppo(policy.clone()),
        StrategyConfig::Reinforce(policy),
        // A population of 20 (Real et al. used 100) so that the budget leaves room for cycles.
        StrategyConfig::Evolution(EvolutionConfig { population_size: 20, sample_size: 5, failure_reward: None }),
    ]
}

/// Per run: the mean of the first and of the last 100 rewards (5 batches of 20), and the
/// best reward.
#[derive(Debug, Clone, Copy)]
struct Summary {
    first: f64,
    last: f64,
    best: f64,
}

#[test]
fn ppo_and_evolution_beat_random_search_on_a_hidden_target() {
    // The controller's matrices are tiny (20 × 100 by 100 × 400): gemm's worker threads
    // only add overhead, and halve the speed of this test on two cores. Candle reads this
    // variable at every matmul; this binary runs no other test at the same time.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let space = SearchSpace::nasnet();
    let configs = configs();
    let mut table: Vec<Vec<Summary>> = vec![Vec::new(); configs.len()];
    for seed in SEEDS {
        let target = space.encode(&space.sample(&mut SpaceRng::new(1000 + seed))).unwrap();
        for (i, config) in configs.iter().enumerate() {
            let mut strategy = new_strategy(config, &space, seed).unwrap();
            let rewards = run(strategy.as_mut(), &target);
            let summary = Summary {
                first: mean(&rewards[..100]),
                last: mean(&rewards[BUDGET - 100..]),
                best: rewards.iter().copied().fold(0.0, f64::max),
            };
            println!("seed {seed} {:>9}: {summary:.3?}", config.name());
            table[i].push(summary);
        }
    }
    let avg = |i: usize, f: fn(&Summary) -> f64| table[i].iter().map(f).sum::<f64>() / SEEDS.len() as f64;
    let [random, ppo, reinforce, evolution] = [0, 1, 2, 3];
    for (i, config) in configs.iter().enumerate() {
        println!(
            "mean over seeds {:>9}: last 100 {:.3}, best {:.3}, first 100 {:.3}",
            config.name(),
            avg(i, |s| s.last),
            avg(i, |s| s.best),
            avg(i, |s| s.first)
        );
    }
    // Uniform sampling matches about a quarter of the decisions (1/2..1/6 for inputs,
    // 1/13 for ops, 1/2 for combines), and does not improve.
    assert!((0.2..0.3).contains(&avg(random, |s| s.last)));
    assert!(avg(ppo, |s| s.last) > avg(random, |s| s.last) + 0.1);
    assert!(avg(ppo, |s| s.best) > avg(random, |s| s.best) + 0.05);
    assert!(avg(evolution, |s| s.last) > avg(random, |s| s.last) + 0.15);
    assert!(avg(evolution, |s| s.best) > avg(random, |s| s.best) + 0.05);
    assert!(avg(reinforce, |s| s.last) > avg(random, |s| s.last) + 0.03);
    // The controller learns: its batches get better, on every seed.
    for s in &table[ppo] {
        assert!(s.last > s.first + 0.1, "{s:?}");
    }
}
