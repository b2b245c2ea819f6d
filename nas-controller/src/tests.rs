use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use expect_test::expect;
use nas_space::{Decision, SearchSpace, SpaceRng};

use super::*;

/// A fresh, empty directory under the system temp dir, unique per test and process, removed
/// on drop.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("nas-controller-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A reward that depends only on the actions, so runs can be compared exactly.
fn toy_reward(actions: &[usize]) -> f64 {
    actions.iter().enumerate().filter(|(i, &a)| a == i % 3).count() as f64 / actions.len() as f64
}

fn ppo(seed: u64) -> PolicyStrategy {
    PolicyStrategy::new(Algorithm::Ppo, &PpoConfig::default(), &SearchSpace::nasnet(), seed).unwrap()
}

fn small_ppo_config() -> PpoConfig {
    PpoConfig { lstm_units: 16, batch_size: 6, ppo_epochs: 2, learning_rate: 0.01, ..PpoConfig::default() }
}

#[test]
fn proposals_are_valid_specs_and_their_encoding() {
    let space = SearchSpace::nasnet();
    let mut strategy = ppo(1);
    let batch = strategy.propose(100).unwrap();
    assert_eq!(batch.len(), 20);
    for (i, p) in batch.iter().enumerate() {
        assert_eq!(p.id, i as u64);
        space.validate_spec(&p.spec).unwrap();
        assert_eq!(space.encode(&p.spec).unwrap(), p.actions);
        assert_eq!(space.decode(&p.actions).unwrap(), p.spec);
        let lp = p.log_prob.unwrap();
        assert!(lp < 0.0 && lp.is_finite(), "log_prob {lp}");
        assert_eq!((p.parent, p.note.as_deref()), (None, None));
    }
}

#[test]
fn input_head_covers_exactly_the_available_states() {
    let space = SearchSpace::nasnet();
    let steps = space.steps();
    let controller = ppo(2);
    let sampled = controller.controller().sample(300, &mut SpaceRng::new(3)).unwrap();
    let mut seen = vec![vec![false; 13]; steps.len()];
    for s in &sampled {
        assert_eq!(s.actions.len(), 50);
        for (i, (&a, step)) in s.actions.iter().zip(&steps).enumerate() {
            assert!(a < step.choices, "step {i} ({step}): {a} >= {}", step.choices);
            seen[i][a] = true;
        }
    }
    // With near-uniform fresh weights, 300 draws reach every available choice, and no other.
    for (i, step) in steps.iter().enumerate() {
        let reached = seen[i].iter().filter(|&&s| s).count();
        assert_eq!(reached, step.choices, "step {i} ({step})");
        if step.decision == Decision::Input {
            assert_eq!(step.choices, 2 + step.block);
        }
    }
}

#[test]
fn log_prob_matches_teacher_forcing() {
    let strategy = ppo(4);
    let controller = strategy.controller();
    let sampled = controller.sample(7, &mut SpaceRng::new(5)).unwrap();
    let actions: Vec<Vec<usize>> = sampled.iter().map(|s| s.actions.clone()).collect();
    let (log_prob, entropy) = controller.evaluate(&actions).unwrap();
    let log_prob = log_prob.to_vec1::<f32>().unwrap();
    let entropy = entropy.to_vec1::<f32>().unwrap();
    for (i, s) in sampled.iter().enumerate() {
        assert!((s.log_prob - log_prob[i] as f64).abs() < 1e-4, "{} vs {}", s.log_prob, log_prob[i]);
        assert!((s.entropy - entropy[i] as f64).abs() < 1e-3, "{} vs {}", s.entropy, entropy[i]);
    }
    // Fresh weights give near-uniform softmaxes: the entropy is close to the uniform one.
    let uniform: f64 = SearchSpace::nasnet().steps().iter().map(|s| (s.choices as f64).ln()).sum();
    assert!((sampled[0].entropy - uniform).abs() < 0.5, "{} vs {uniform}", sampled[0].entropy);
    // One sequence at a time gives the same numbers as the batch.
    let (single, _) = controller.evaluate(&actions[2..3]).unwrap();
    assert!((single.to_vec1::<f32>().unwrap()[0] - log_prob[2]).abs() < 1e-4);
    // Out-of-range actions are refused, not clamped.
    let mut bad = actions[0].clone();
    bad[0] = 2; // block 0 reads states 0 and 1 only
    assert!(matches!(
        controller.evaluate(&[bad]),
        Err(ControllerError::Space(nas_space::SpecError::ActionOutOfRange { step: 0, .. }))
    ));
}

#[test]
fn weights_start_uniform_in_init_range_with_documented_count() {
    let strategy = ppo(6);
    let controller = strategy.controller();
    // go 100 + embeddings (6 + 13 + 2) · 100 + LSTM 2 · 100 · 400 + 400
    // + heads (100 + 1) · (6 + 13 + 2).
    assert_eq!(controller.num_params(), 100 + 21 * 100 + 80_400 + 101 * 21);
    assert_eq!(controller.num_params(), 84_721);
    let (mut lo, mut hi) = (f32::MAX, f32::MIN);
    for (name, var) in controller.vars() {
        let values = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for v in values {
            assert!((-0.1..=0.1).contains(&v), "{name}: {v}");
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    assert!(lo < -0.099 && hi > 0.099, "range [{lo}, {hi}] does not fill [-0.1, 0.1]");
    let shapes: Vec<String> =
        Controller::param_shapes(&SearchSpace::nasnet(), 100).iter().map(|(n, s)| format!("{n} {s:?}")).collect();
    expect![[r#"
        go [1, 100]
        embed.input [6, 100]
        embed.op [13, 100]
        embed.combine [2, 100]
        lstm.w_ih [100, 400]
        lstm.w_hh [100, 400]
        lstm.bias [400]
        head.input.weight [100, 6]
        head.input.bias [6]
        head.op.weight [100, 13]
        head.op.bias [13]
        head.combine.weight [100, 2]
        head.combine.bias [2]"#]]
    .assert_eq(&shapes.join("\n"));
}

/// Runs `rounds` of: propose up to `chunk`, report all but the last `hold` of them.
/// Returns every proposal made.
fn drive(strategy: &mut dyn Strategy, rounds: usize, chunk: usize) -> Vec<Proposal> {
    let mut all = Vec::new();
    for _ in 0..rounds {
        let batch = strategy.propose(chunk).unwrap();
        for p in &batch {
            let reward = if p.id % 11 == 5 { None } else { Some(toy_reward(&p.actions)) };
            strategy.report(p.id, reward).unwrap();
        }
        all.extend(batch);
    }
    all
}

#[test]
fn same_seed_gives_same_proposals() {
    let space = SearchSpace::nasnet();
    for config in ["ppo", "reinforce", "random", "evolution"] {
        let mut config: StrategyConfig = config.parse().unwrap();
        match &mut config {
            StrategyConfig::Ppo(c) | StrategyConfig::Reinforce(c) => *c = small_ppo_config(),
            StrategyConfig::Evolution(c) => *c = EvolutionConfig { population_size: 8, sample_size: 3, ..*c },
            StrategyConfig::Random => {}
        }
        let mut a = new_strategy(&config, &space, 9).unwrap();
        let mut b = new_strategy(&config, &space, 9).unwrap();
        let mut c = new_strategy(&config, &space, 10).unwrap();
        let pa = drive(a.as_mut(), 6, 4);
        let pb = drive(b.as_mut(), 6, 4);
        let pc = drive(c.as_mut(), 6, 4);
        assert_eq!(pa, pb, "{config}");
        assert_ne!(pa, pc, "{config}");
        assert_eq!(a.stats(), b.stats(), "{config}");
        assert_eq!(a.name(), config.name());
    }
}

#[test]
fn save_and_load_mid_batch_continue_identically() {
    let space = SearchSpace::nasnet();
    let configs = [
        StrategyConfig::Ppo(small_ppo_config()),
        StrategyConfig::Reinforce(PpoConfig { grad_clip_norm: Some(0.5), ..small_ppo_config() }),
        StrategyConfig::Random,
        StrategyConfig::Evolution(EvolutionConfig { population_size: 6, sample_size: 2, failure_reward: None }),
    ];
    for config in configs {
        let dir = temp_dir(&format!("resume-{}", config.name()));
        let mut a = new_strategy(&config, &space, 21).unwrap();
        // A full batch and an update first, so that Adam's moments and the baseline matter.
        drive(a.as_mut(), 3, 3);
        // Then leave proposals outstanding, some reported and some not.
        let held = a.propose(4).unwrap();
        a.report(held[1].id, Some(0.25)).unwrap();
        a.save(&dir).unwrap();
        assert!(has_saved_strategy(&dir));
        let b = load_strategy(&dir).unwrap();
        assert_eq!(b.name(), a.name());
        assert_eq!(b.pending(), a.pending(), "{config}");
        assert_eq!(b.stats(), a.stats(), "{config}");
        // Save again from the loaded copy: same files' meaning, one weights file left.
        b.save(&dir).unwrap();
        drop(b);
        let weights = std::fs::read_dir(&*dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("strategy-weights-"))
            .count();
        assert_eq!(weights, usize::from(matches!(config, StrategyConfig::Ppo(_) | StrategyConfig::Reinforce(_))));
        let mut b = load_strategy(&dir).unwrap();
        for s in [&mut a, &mut b] {
            for p in s.pending() {
                s.report(p.id, Some(toy_reward(&p.actions))).unwrap();
            }
        }
        let pa = drive(a.as_mut(), 6, 3);
        let pb = drive(b.as_mut(), 6, 3);
        assert!(!pa.is_empty());
        assert_eq!(pa, pb, "{config}");
        assert_eq!(a.stats(), b.stats(), "{config}");
    }
}

#[test]
fn reports_of_unknown_or_reported_ids_are_errors() {
    for name in ["ppo", "random", "evolution"] {
        let mut s = new_strategy(&name.parse().unwrap(), &SearchSpace::nasnet(), 1).unwrap();
        let ps = s.propose(3).unwrap();
        let err = s.report(3, Some(0.5)).unwrap_err();
        assert!(matches!(err, ControllerError::UnknownProposal { id: 3, next_id: 3 }), "{err}");
        s.report(ps[0].id, Some(0.5)).unwrap();
        let err = s.report(ps[0].id, Some(0.5)).unwrap_err();
        assert!(matches!(err, ControllerError::DuplicateReport { id: 0 }), "{err}");
        let err = s.report(ps[1].id, Some(f64::NAN)).unwrap_err();
        assert!(matches!(err, ControllerError::InvalidReward { id: 1, .. }), "{err}");
        // A refused report changes nothing.
        assert_eq!(s.pending().iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2]);
        s.report(ps[1].id, None).unwrap();
        assert_eq!(s.stats()["failed"], 1);
    }
    expect!["unknown proposal id 7 (this strategy has handed out ids 0..3)"]
        .assert_eq(&ControllerError::UnknownProposal { id: 7, next_id: 3 }.to_string());
}

fn corrupt_path(err: ControllerError) -> PathBuf {
    match err {
        ControllerError::CorruptState { path, .. } => path,
        other => panic!("expected CorruptState, got {other}"),
    }
}

#[test]
fn broken_state_files_are_named_errors() {
    let dir = temp_dir("corrupt");
    let missing = load_strategy(&dir).unwrap_err();
    assert!(matches!(missing, ControllerError::MissingState { .. }), "{missing}");
    assert!(!has_saved_strategy(&dir));

    let mut s = ppo(3);
    s.propose(5).unwrap();
    s.save(&dir).unwrap();
    let json_path = dir.join(STATE_FILE);
    let json = std::fs::read_to_string(&json_path).unwrap();

    // Truncated JSON.
    std::fs::write(&json_path, &json[..json.len() / 2]).unwrap();
    let err = load_strategy(&dir).unwrap_err();
    assert!(err.to_string().contains("strategy.json"), "{err}");
    assert_eq!(corrupt_path(err), json_path);

    // Garbled JSON, wrong version.
    std::fs::write(&json_path, "\u{0}garbage{").unwrap();
    assert_eq!(corrupt_path(load_strategy(&dir).unwrap_err()), json_path);
    std::fs::write(&json_path, json.replacen("\"version\": 1", "\"version\": 99", 1)).unwrap();
    let err = load_strategy(&dir).unwrap_err();
    assert!(
        err.to_string().contains("strategy.json: format version 99 is not supported (this build reads version 1)"),
        "{err}"
    );

    // A garbled or truncated weights file: the error names the weights file.
    std::fs::write(&json_path, &json).unwrap();
    assert!(load_strategy(&dir).is_ok());
    let weights = std::fs::read_dir(&*dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("strategy-weights-"))
        .unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    assert_eq!(corrupt_path(load_strategy(&dir).unwrap_err()), weights);
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0xff;
    std::fs::write(&weights, &flipped).unwrap();
    assert_eq!(corrupt_path(load_strategy(&dir).unwrap_err()), weights);
    std::fs::remove_file(&weights).unwrap();
    let err = load_strategy(&dir).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(corrupt_path(err), json_path);
}

#[test]
fn an_interrupted_save_leaves_the_old_state() {
    let dir = temp_dir("interrupted");
    let mut s = ppo(8);
    let first = s.propose(20).unwrap();
    s.save(&dir).unwrap();
    for p in &first {
        s.report(p.id, Some(toy_reward(&p.actions))).unwrap();
    }
    // A kill after the new weights file is written but before the JSON is renamed leaves a
    // stray weights file and a stray temp JSON; the old state still loads.
    std::fs::write(dir.join("strategy-weights-stray.safetensors"), b"partial").unwrap();
    std::fs::write(dir.join("strategy.json.tmp"), b"{\"format\"").unwrap();
    let old = load_strategy(&dir).unwrap();
    assert_eq!(old.pending(), first);
    assert_eq!(old.stats()["updates"], 0);
    // The next save cleans up.
    s.save(&dir).unwrap();
    assert!(!dir.join("strategy-weights-stray.safetensors").exists());
    assert_eq!(load_strategy(&dir).unwrap().stats()["updates"], 1);
}

#[test]
fn ppo_waits_for_its_batch_and_leaves_failures_out() {
    let mut s = ppo(12);
    assert!(s.propose(0).unwrap().is_empty());
    let a = s.propose(5).unwrap();
    let b = s.propose(100).unwrap();
    assert_eq!((a.len(), b.len()), (5, 15));
    assert_eq!(b[0].id, 5);
    assert!(s.propose(1).unwrap().is_empty());
    // Reports in any order; every child fails: no update, and the next batch comes.
    for p in b.iter().rev().chain(&a) {
        s.report(p.id, None).unwrap();
    }
    assert_eq!((s.updates(), s.baseline()), (0, None));
    let c = s.propose(20).unwrap();
    assert_eq!(c.len(), 20);
    assert_eq!(c[0].id, 20);
    // A batch with rewards updates the policy; the first batch sets the baseline to its mean.
    let rewards: Vec<f64> = c.iter().map(|p| toy_reward(&p.actions)).collect();
    for (p, &r) in c.iter().zip(&rewards) {
        s.report(p.id, Some(r)).unwrap();
    }
    let mean = rewards.iter().sum::<f64>() / 20.0;
    assert_eq!(s.updates(), 1);
    assert!((s.baseline().unwrap() - mean).abs() < 1e-12);
    let stats = s.stats();
    for key in ["baseline", "last_loss", "last_entropy", "sampled_entropy", "last_clip_fraction", "updates"] {
        assert!(!stats[key].is_null(), "{key} in {stats}");
    }
    // The weights moved.
    let d = s.propose(20).unwrap();
    let (lp, _) = s.controller().evaluate(&[c[0].actions.clone()]).unwrap();
    assert!((lp.to_vec1::<f32>().unwrap()[0] as f64 - c[0].log_prob.unwrap()).abs() > 1e-6);
    assert_eq!(d.len(), 20);
}

/// The baseline takes in the batch's mean (default) or each reward in id order.
#[test]
fn the_baseline_moves_per_batch_or_per_child() {
    for (per, expected) in [(BaselineUpdate::Batch, 0.4), (BaselineUpdate::Child, 0.45)] {
        let config = PpoConfig { batch_size: 2, baseline_decay: 0.5, baseline_per: per, ..small_ppo_config() };
        let mut s = PolicyStrategy::new(Algorithm::Ppo, &config, &SearchSpace::nasnet(), 3).unwrap();
        let p = s.propose(2).unwrap();
        // Reported out of order: the fold follows ids (0.2 then 0.6) from the mean 0.4:
        // 0.5·(0.5·0.4 + 0.5·0.2) + 0.5·0.6 = 0.45.
        s.report(p[1].id, Some(0.6)).unwrap();
        s.report(p[0].id, Some(0.2)).unwrap();
        assert!((s.baseline().unwrap() - expected).abs() < 1e-12, "{per:?}: {:?}", s.baseline());
    }
    assert_eq!("child".parse::<BaselineUpdate>(), Ok(BaselineUpdate::Child));
    assert!("epoch".parse::<BaselineUpdate>().unwrap_err().contains("batch or child"));
}

#[test]
fn reinforce_and_ppo_raise_the_probability_of_rewarded_actions() {
    for algorithm in [Algorithm::Ppo, Algorithm::Reinforce] {
        let config = PpoConfig { learning_rate: 0.01, ..small_ppo_config() };
        let mut s = PolicyStrategy::new(algorithm, &config, &SearchSpace::nasnet(), 30).unwrap();
        let batch = s.propose(6).unwrap();
        // Only the first proposal is rewarded.
        for p in &batch {
            s.report(p.id, Some(if p.id == 0 { 1.0 } else { 0.0 })).unwrap();
        }
        let actions: Vec<Vec<usize>> = batch.iter().map(|p| p.actions.clone()).collect();
        let (lp, _) = s.controller().evaluate(&actions).unwrap();
        let gain: Vec<f64> =
            lp.to_vec1::<f32>().unwrap().iter().zip(&batch).map(|(&l, p)| l as f64 - p.log_prob.unwrap()).collect();
        // The rewarded sequence gains clearly, and more than any unrewarded one.
        assert!(gain[0] > 0.1, "{algorithm:?}: {gain:?}");
        assert!(gain[1..].iter().all(|&g| g < gain[0] - 0.1), "{algorithm:?}: {gain:?}");
    }
}

#[test]
fn evolution_ages_its_population_and_mutates_one_decision() {
    let space = SearchSpace::nasnet();
    let config = EvolutionConfig { population_size: 10, sample_size: 3, failure_reward: None };
    let mut evo = Evolution::new(&config, &space, 4).unwrap();
    // The initial population: 10 random cells, then it waits.
    let initial = evo.propose(25).unwrap();
    assert_eq!(initial.len(), 10);
    assert!(initial.iter().all(|p| p.parent.is_none() && p.note.as_deref() == Some("initial population")));
    assert!(evo.propose(5).unwrap().is_empty());
    // A failed initial cell is replaced by another random one.
    evo.report(initial[0].id, None).unwrap();
    let replacement = evo.propose(5).unwrap();
    assert_eq!(replacement.len(), 1);
    assert!(replacement[0].parent.is_none());
    let mut expected: VecDeque<u64> = VecDeque::new();
    for p in initial[1..].iter().chain(&replacement) {
        evo.report(p.id, Some(toy_reward(&p.actions))).unwrap();
        expected.push_back(p.id);
    }
    assert_eq!(evo.population().len(), 10);
    let mut actions_of: std::collections::HashMap<u64, Vec<usize>> =
        initial.iter().chain(&replacement).map(|p| (p.id, p.actions.clone())).collect();
    for round in 0..30 {
        let children = evo.propose(4).unwrap();
        assert_eq!(children.len(), 4);
        for child in &children {
            let parent = child.parent.expect("a child names its parent");
            assert!(expected.contains(&parent), "parent {parent} is not alive");
            let diff = actions_of[&parent].iter().zip(&child.actions).filter(|(a, b)| a != b).count();
            assert_eq!(diff, 1, "child {} of {parent}: {}", child.id, child.note.as_deref().unwrap());
            space.validate_spec(&child.spec).unwrap();
            actions_of.insert(child.id, child.actions.clone());
        }
        for child in &children {
            let failed = round % 7 == 3 && child.id % 2 == 0;
            evo.report(child.id, if failed { None } else { Some(toy_reward(&child.actions)) }).unwrap();
            if !failed {
                expected.push_back(child.id);
                expected.pop_front();
            }
            assert!(evo.population().len() <= 10);
            let ids: Vec<u64> = evo.population().iter().map(|m| m.id).collect();
            assert_eq!(ids, Vec::from(expected.clone()), "the oldest leaves first");
        }
    }
    assert!(evo.stats()["removed"].as_u64().unwrap() > 50);
}

#[test]
fn config_parses_validates_and_round_trips() {
    assert_eq!("ppo".parse::<StrategyConfig>().unwrap(), StrategyConfig::Ppo(PpoConfig::default()));
    assert_eq!("evolution".parse::<StrategyConfig>().unwrap().name(), "evolution");
    let err = "bayes".parse::<StrategyConfig>().unwrap_err();
    expect!["unknown strategy `bayes`; known: ppo, reinforce, random, evolution"].assert_eq(&err.to_string());

    let defaults = PpoConfig::default();
    assert_eq!(
        (defaults.lstm_units, defaults.init_range, defaults.learning_rate, defaults.entropy_weight),
        (100, 0.1, 0.00035, 0.00001)
    );
    assert_eq!((defaults.baseline_decay, defaults.batch_size), (0.95, 20));

    // Partial JSON takes defaults for the rest.
    let config: StrategyConfig = serde_json::from_str(r#"{"strategy": "ppo", "learning_rate": 0.002}"#).unwrap();
    assert_eq!(config, StrategyConfig::Ppo(PpoConfig { learning_rate: 0.002, ..PpoConfig::default() }));
    let typo = serde_json::from_str::<StrategyConfig>(r#"{"strategy": "ppo", "learning_rat": 0.002}"#);
    assert!(typo.unwrap_err().to_string().contains("unknown field `learning_rat`"));
    let typo = serde_json::from_str::<StrategyConfig>(r#"{"strategy": "evolution", "population": 5}"#);
    assert!(typo.is_err());
    for config in [
        config,
        StrategyConfig::Random,
        StrategyConfig::Reinforce(PpoConfig { tanh_constant: Some(2.5), ..PpoConfig::default() }),
        StrategyConfig::Evolution(EvolutionConfig::default()),
    ] {
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<StrategyConfig>(&json).unwrap(), config, "{json}");
    }

    let bad = StrategyConfig::Ppo(PpoConfig { baseline_decay: 1.5, ..PpoConfig::default() });
    let err = new_strategy(&bad, &SearchSpace::nasnet(), 0).unwrap_err();
    expect!["invalid config: `baseline_decay` = 1.5: must lie in [0, 1)"].assert_eq(&err.to_string());
    let bad = StrategyConfig::Evolution(EvolutionConfig { population_size: 5, sample_size: 6, failure_reward: None });
    assert!(matches!(bad.validate(), Err(ControllerError::InvalidConfig { field: "sample_size", .. })));
}

#[test]
fn state_file_is_the_commit_point() {
    let dir = temp_dir("commit");
    let mut s = new_strategy(&StrategyConfig::Random, &SearchSpace::nasnet(), 2).unwrap();
    s.propose(2).unwrap();
    s.save(&dir).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!(json["format"], STATE_FORMAT);
    assert_eq!(json["version"], STATE_VERSION);
    assert_eq!(json["state"]["kind"], "random");
    assert!(json["weights"].is_null());
    assert!(!dir.join("strategy.json.tmp").exists());
}

/// `sample` draws cells of the space without making proposals, seeded like everything else;
/// evolution samples mutations once its population is in, and the controller's samples follow
/// its policy (after updates towards one op, that op dominates them).
#[test]
fn samples_are_not_proposals() {
    let space = SearchSpace::nasnet().add_only();
    for config in [
        StrategyConfig::Ppo(small_ppo_config()),
        StrategyConfig::Random,
        StrategyConfig::Evolution(EvolutionConfig { population_size: 4, sample_size: 2, failure_reward: None }),
    ] {
        let mut a = new_strategy(&config, &space, 5).unwrap();
        let mut b = new_strategy(&config, &space, 5).unwrap();
        let cells = a.sample(6).unwrap();
        assert_eq!(cells.len(), 6);
        for cell in &cells {
            space.validate_spec(cell).unwrap();
        }
        assert_eq!(cells, b.sample(6).unwrap(), "{config:?}");
        assert!(a.pending().is_empty(), "{config:?}");
        // Proposals still come and are reported as before.
        let proposals = a.propose(4).unwrap();
        assert!(!proposals.is_empty());
        for p in proposals {
            a.report(p.id, Some(0.5)).unwrap();
        }
    }
    // Evolution, population in: every sample is one mutation away from a member.
    let config =
        StrategyConfig::Evolution(EvolutionConfig { population_size: 3, sample_size: 2, failure_reward: None });
    let mut evo = new_strategy(&config, &space, 6).unwrap();
    let members: Vec<_> = evo.propose(3).unwrap();
    for p in &members {
        evo.report(p.id, Some(0.1 * p.id as f64)).unwrap();
    }
    for cell in evo.sample(5).unwrap() {
        let distance = |m: &nas_space::CellSpec| {
            let (x, y) = (space.encode(m).unwrap(), space.encode(&cell).unwrap());
            x.iter().zip(&y).filter(|(a, b)| a != b).count()
        };
        assert!(members.iter().any(|m| distance(&m.spec) <= 1), "{cell}");
    }
    // The controller, rewarded for sep_conv_3x3 everywhere, samples it far more often.
    let mut ppo = new_strategy(&StrategyConfig::Ppo(small_ppo_config()), &space, 7).unwrap();
    let sep = space.ops.iter().position(|&op| op == nas_space::Op::SepConv3x3).unwrap();
    let share = |cells: &[nas_space::CellSpec]| {
        let ops: Vec<_> = cells.iter().flat_map(|c| space.encode(c).unwrap()).collect();
        let steps = space.steps();
        let op_steps: Vec<usize> =
            (0..ops.len()).filter(|&i| steps[i % steps.len()].decision == Decision::Op).collect();
        op_steps.iter().filter(|&&i| ops[i] == sep).count() as f64 / op_steps.len() as f64
    };
    let before = share(&ppo.sample(40).unwrap());
    for _ in 0..30 {
        for p in ppo.propose(100).unwrap() {
            let reward = share(std::slice::from_ref(&p.spec));
            ppo.report(p.id, Some(reward)).unwrap();
        }
    }
    let after = share(&ppo.sample(40).unwrap());
    assert!(after > before + 0.1, "sep_conv_3x3 share {before:.3} -> {after:.3}");
}
