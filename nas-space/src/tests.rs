//! Golden and property tests of the grammar, the search space and the cost model.
//! The text and JSON forms test themselves in `text.rs` and `json.rs`; drawings in `render.rs`.

use std::collections::HashSet;

use expect_test::expect;

use crate::cost::network_cost;
use crate::{
    Block, Cell, CellKind, CellOutput, CellSpec, Combine, MutationChange, NetSize, NetworkConfig, Op, SearchSpace,
    Side, SpaceRng, SpecError,
};

// ---------------------------------------------------------------- presets

/// TF-Slim `nasnet_utils.py`, `NasNetANormalCell` / `NasNetAReductionCell`.
#[test]
fn nasnet_a_matches_tf_slim_lists() {
    let tf_slim = |cell: &Cell| {
        let indices: Vec<usize> = cell.blocks.iter().flat_map(|b| b.inputs).collect();
        let ops: Vec<&str> = cell.blocks.iter().flat_map(|b| b.ops).map(|op| op.tf_slim_name().unwrap()).collect();
        let used: Vec<u8> = cell.used_hiddenstates().iter().map(|&u| u as u8).collect();
        (indices, ops, used)
    };
    let spec = CellSpec::nasnet_a();
    assert_eq!(
        tf_slim(&spec.normal),
        (
            vec![0, 1, 1, 1, 0, 1, 1, 1, 0, 0],
            vec![
                "separable_5x5_2",
                "separable_3x3_2",
                "separable_5x5_2",
                "separable_3x3_2",
                "avg_pool_3x3",
                "none",
                "avg_pool_3x3",
                "avg_pool_3x3",
                "separable_3x3_2",
                "none"
            ],
            vec![1, 0, 0, 0, 0, 0, 0]
        )
    );
    assert_eq!(
        tf_slim(&spec.reduction),
        (
            vec![0, 1, 0, 1, 0, 1, 3, 2, 2, 0],
            vec![
                "separable_5x5_2",
                "separable_7x7_2",
                "max_pool_3x3",
                "separable_7x7_2",
                "avg_pool_3x3",
                "separable_5x5_2",
                "none",
                "avg_pool_3x3",
                "separable_3x3_2",
                "max_pool_3x3"
            ],
            vec![1, 1, 1, 0, 0, 0, 0]
        )
    );
    assert!(spec.normal.blocks.iter().chain(&spec.reduction.blocks).all(|b| b.combine == Combine::Add));
    spec.validate().unwrap();
    SearchSpace::nasnet().validate_spec(&spec).unwrap();
}

/// The paper's literal rule gives 5 and 3 concatenated states (DARTS's genotype).
#[test]
fn unused_rule_differs_from_tf_slim_on_nasnet_a() {
    let mut spec = CellSpec::nasnet_a();
    spec.normal.output = CellOutput::UnusedBlocks;
    spec.reduction.output = CellOutput::UnusedBlocks;
    assert_eq!(spec.normal.output_states(), vec![2, 3, 4, 5, 6]);
    assert_eq!(spec.reduction.output_states(), vec![4, 5, 6]);
}

#[test]
fn presets_by_name_and_missing_ones_explained() {
    assert_eq!(crate::presets::preset("NASNet_A"), Some(CellSpec::nasnet_a()));
    assert_eq!(crate::presets::preset("nasnet-b"), None);
    assert!(crate::presets::UNAVAILABLE.iter().any(|(name, why)| *name == "nasnet-b" && why.contains("Figure 8")));
}

// ---------------------------------------------------------------- ops

#[test]
fn op_names_round_trip_and_aliases() {
    for op in Op::ALL {
        assert_eq!(op.name().parse::<Op>().unwrap(), op);
        if let Some(tf) = op.tf_slim_name() {
            assert_eq!(tf.parse::<Op>().unwrap(), op);
        }
    }
    assert_eq!("none".parse::<Op>().unwrap(), Op::Identity);
    assert_eq!("separable_5x5_2".parse::<Op>().unwrap(), Op::SepConv5x5);
    assert_eq!("SKIP_CONNECT".parse::<Op>().unwrap(), Op::Identity);
    let names: HashSet<&str> = Op::ALL.iter().map(|op| op.name()).collect();
    assert_eq!(names.len(), 13);
    for c in Combine::ALL {
        assert_eq!(c.name().parse::<Combine>().unwrap(), c);
    }
}

// ---------------------------------------------------------------- cost model

/// Keras 3 `NASNetMobile()` and `NASNetLarge()` report these totals (with BN moving
/// statistics) and trainable counts; timm's `nasnetalarge` has 88,753,150 parameters.
#[test]
fn cost_mobile_large_cifar_match_references() {
    let spec = CellSpec::nasnet_a();
    let mobile = network_cost(&spec, &NetworkConfig::mobile()).unwrap();
    assert_eq!(mobile.network.params_trainable, 5_289_978);
    assert_eq!(mobile.network.params_total(), 5_326_716);
    // Paper Table 3: 564M mult-adds, within 0.5 %.
    assert!((mobile.network.mult_adds as f64 / 564e6 - 1.0).abs() < 0.005, "{}", mobile.network.mult_adds);

    let large = network_cost(&spec, &NetworkConfig::large()).unwrap();
    assert_eq!(large.network.params_trainable, 88_753_150);
    assert_eq!(large.network.params_total(), 88_949_818);
    // Paper Table 2: 23.8B mult-adds, within 1 %.
    assert!((large.network.mult_adds as f64 / 23.8e9 - 1.0).abs() < 0.01, "{}", large.network.mult_adds);

    let cifar = network_cost(&spec, &NetworkConfig::cifar()).unwrap();
    assert_eq!(cifar.network.params_trainable, 3_346_538);
    assert_eq!(cifar.network.params_total(), 3_383_786);
}

/// The same counts with 1001 classes (TF checkpoints) and the aux heads.
#[test]
fn cost_aux_heads_and_1001_classes() {
    let spec = CellSpec::nasnet_a();
    let mut mobile = NetworkConfig::mobile();
    mobile.num_classes = 1001;
    let r = network_cost(&spec, &mobile).unwrap();
    assert_eq!((r.network.params_trainable, r.network.params_total()), (5_291_035, 5_327_773));
    let mut large = NetworkConfig::large();
    large.num_classes = 1001;
    let r = network_cost(&spec, &large).unwrap();
    assert_eq!((r.network.params_trainable, r.network.params_total()), (88_757_183, 88_953_851));

    let aux = |config: NetworkConfig| network_cost(&spec, &config).unwrap().aux_head.unwrap().params_trainable;
    // 1.63M, 2.41M, 4.57M in the table; the exact sums of the layers of §5.10:
    // 1×1 conv C→128, BN, k×k conv 128→768, BN, FC 768→classes.
    assert_eq!(aux(NetworkConfig::cifar()), 384 * 128 + 256 + 16 * 128 * 768 + 1536 + 768 * 10 + 10);
    assert_eq!(aux(NetworkConfig::mobile()), 528 * 128 + 256 + 16 * 128 * 768 + 1536 + 768 * 1000 + 1000);
    assert_eq!(aux(NetworkConfig::large()), 2016 * 128 + 256 + 36 * 128 * 768 + 1536 + 768 * 1000 + 1000);
    let mut no_aux = NetworkConfig::cifar();
    no_aux.use_aux_head = false;
    assert_eq!(network_cost(&spec, &no_aux).unwrap().aux_head, None);
}

/// Keras 3.15.1 `keras.applications.nasnet.NASNet` on 32×32×3 with 10 classes:
/// (penultimate, N, skip_reduction, total, trainable).
#[test]
fn cost_matches_keras_small_imagenet_skeletons() {
    let spec = CellSpec::nasnet_a();
    for (p, n, skip, total, trainable) in [
        (96, 1, false, 31_736u64, 30_370u64),
        (96, 1, true, 31_352, 29_986),
        (192, 1, false, 79_284, 76_616),
        (384, 2, false, 373_558, 365_534),
        (768, 6, false, 3_375_874, 3_338_386),
    ] {
        let mut config = NetworkConfig::parse_net(&format!("{n}@{p}"), &spec).unwrap();
        config.image_size = 32;
        config.num_classes = 10;
        config.skip_reduction_layer_input = skip;
        config.use_aux_head = false;
        let r = network_cost(&spec, &config).unwrap();
        assert_eq!((r.network.params_total(), r.network.params_trainable), (total, trainable), "{n}@{p} skip={skip}");
    }
}

/// The per-part table for CIFAR (a change in any layer's count shows up here).
#[test]
fn cost_report_cifar_golden() {
    let r = network_cost(&CellSpec::nasnet_a(), &NetworkConfig::cifar()).unwrap();
    let text = r.to_string();
    let head: Vec<&str> = text.lines().take(4).chain(text.lines().rev().take(2)).collect();
    expect![[r#"
        part                    trainable       bn stats        mult-adds
        stem conv                   2,784            192        2,654,208
        cell_0                     40,384            960       40,370,176
        cell_1                     25,152            768       24,969,216
        aux head (train)        1,631,498          1,792        2,366,976
        total (no aux)          3,346,538         37,248      544,333,312"#]]
    .assert_eq(&head.join("\n"));
}

/// Endpoint shapes of TF-Slim `nasnet_test.py`.
#[test]
fn endpoint_shapes() {
    let spec = CellSpec::nasnet_a();
    let shapes = |config: NetworkConfig| -> Vec<(String, String)> {
        config.plan(&spec).unwrap().endpoints().into_iter().map(|(n, s)| (n, s.hwc())).collect()
    };
    let cifar = shapes(NetworkConfig::cifar());
    let get = |list: &[(String, String)], name: &str| list.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(get(&cifar, "Stem"), "32x32x96");
    assert_eq!(get(&cifar, "Cell_5"), "32x32x192");
    assert_eq!(get(&cifar, "Reduction_Cell_0"), "16x16x256");
    assert_eq!(get(&cifar, "Cell_11"), "16x16x384");
    assert_eq!(get(&cifar, "Reduction_Cell_1"), "8x8x512");
    assert_eq!(get(&cifar, "Cell_17"), "8x8x768");
    assert_eq!(cifar.len(), 1 + 18 + 2);

    let mobile = shapes(NetworkConfig::mobile());
    assert_eq!(get(&mobile, "Stem"), "28x28x88");
    assert_eq!(get(&mobile, "Cell_3"), "28x28x264");
    assert_eq!(get(&mobile, "Reduction_Cell_0"), "14x14x352");
    assert_eq!(get(&mobile, "Cell_7"), "14x14x528");
    assert_eq!(get(&mobile, "Reduction_Cell_1"), "7x7x704");
    assert_eq!(get(&mobile, "Cell_11"), "7x7x1056");

    let large = shapes(NetworkConfig::large());
    assert_eq!(get(&large, "Stem"), "42x42x336");
    assert_eq!(get(&large, "Cell_5"), "42x42x1008");
    assert_eq!(get(&large, "Reduction_Cell_0"), "21x21x1344");
    assert_eq!(get(&large, "Cell_11"), "21x21x2016");
    assert_eq!(get(&large, "Reduction_Cell_1"), "11x11x2688");
    assert_eq!(get(&large, "Cell_17"), "11x11x4032");
}

#[test]
fn skeleton_schedule() {
    let cifar = NetworkConfig::cifar();
    assert_eq!(cifar.reduction_indices(), vec![6, 12]);
    assert_eq!(cifar.aux_head_cell(), Some(11));
    assert_eq!(cifar.total_num_cells(), 20);
    let mobile = NetworkConfig::mobile();
    assert_eq!(mobile.reduction_indices(), vec![4, 8]);
    assert_eq!(mobile.aux_head_cell(), Some(7));
    assert_eq!(mobile.total_num_cells(), 16);
    assert_eq!(NetworkConfig::large().total_num_cells(), 22);
}

/// `skip_reduction_layer_input`: Large wires `cell_6(reduction_cell_0, cell_4)`,
/// Mobile wires `cell_4(reduction_cell_0, cell_3)` (Cadene's ports).
#[test]
fn prev_layer_wiring() {
    let spec = CellSpec::nasnet_a();
    let plan = NetworkConfig::large().plan(&spec).unwrap();
    let find = |name: &str| plan.cells.iter().position(|c| c.name == name).unwrap();
    let cell6 = &plan.cells[find("cell_6")];
    assert_eq!(cell6.x, find("reduction_cell_0") + 1);
    assert_eq!(cell6.prev, Some(find("cell_4") + 1));
    let cell7 = &plan.cells[find("cell_7")];
    assert_eq!(cell7.prev, Some(find("reduction_cell_0") + 1));

    let plan = NetworkConfig::mobile().plan(&spec).unwrap();
    let find = |name: &str| plan.cells.iter().position(|c| c.name == name).unwrap();
    assert_eq!(plan.cells[find("cell_4")].prev, Some(find("cell_3") + 1));
    // Stem cells: the first has no previous input, the second reads the stem conv.
    assert_eq!(plan.cells[0].prev, None);
    assert_eq!(plan.cells[1].prev, Some(0));
    assert_eq!(plan.cells[0].filter_size, 11);
    assert_eq!(plan.cells[1].filter_size, 22);
    // Drop-path indices run over every cell in forward order.
    assert!(plan.cells.iter().enumerate().all(|(i, c)| c.drop_path_index == i));
    assert_eq!(plan.cells.len(), plan.total_num_cells);
}

/// CIFAR cell_0 reads the raw 96-channel stem as state 1 (a TF-Slim quirk).
#[test]
fn cifar_cell0_projections() {
    use crate::network::PrevAdjust;
    let plan = NetworkConfig::cifar().plan(&CellSpec::nasnet_a()).unwrap();
    let cell0 = &plan.cells[0].layout;
    assert_eq!(cell0.prev_adjust, PrevAdjust::UseX);
    assert_eq!(cell0.states[1].channels, 96);
    // Block 2's identity on state 1 and block 3's two pools on state 1 get projections.
    assert!(cell0.ops[2][1].projection);
    assert!(cell0.ops[3][0].projection && cell0.ops[3][1].projection);
    assert!(!cell0.ops[2][0].projection && !cell0.ops[4][1].projection);
    // State 1 is brought to 32 channels at the concat by a stride-1 factorized reduction.
    assert_eq!(cell0.concat[0].factorized_reduction, Some(1));
    assert!(cell0.concat[1..].iter().all(|c| c.factorized_reduction.is_none()));
    let cell1 = &plan.cells[1].layout;
    assert_eq!(cell1.prev_adjust, crate::network::PrevAdjust::Conv1x1 { c_in: 96 });
}

#[test]
fn net_sizes() {
    let spec = CellSpec::nasnet_a();
    let mobile = NetworkConfig::parse_net("4@1056", &spec).unwrap();
    assert_eq!(mobile, NetworkConfig::mobile());
    let large = NetworkConfig::parse_net("large:6 @ 4032", &spec).unwrap();
    assert_eq!(large, NetworkConfig::large());
    let cifar = NetworkConfig::parse_net("cifar:6@768", &spec).unwrap();
    assert_eq!(cifar, NetworkConfig::cifar());
    assert_eq!(NetworkConfig::cifar().penultimate_filters(&spec), 768);
    assert_eq!("7@2304".parse::<NetSize>().unwrap(), NetSize { n: 7, penultimate_filters: 2304 });
    // A cell with the paper's unused-states rule concatenates 5 states: P = 20F.
    let mut five = spec.clone();
    five.normal.output = CellOutput::UnusedBlocks;
    let config = NetworkConfig::parse_net("cifar:2@640", &five).unwrap();
    assert_eq!(config.num_conv_filters, 32);
    assert_eq!(config.penultimate_filters(&five), 640);
}

#[test]
fn small_child_network_costs() {
    // The search child: N = 2 on CIFAR without aux head builds and is much smaller.
    let mut child = NetworkConfig::cifar();
    child.n = 2;
    child.num_conv_filters = 16;
    let r = network_cost(&CellSpec::nasnet_a(), &child).unwrap();
    assert!(r.network.params_trainable < 400_000, "{}", r.network.params_trainable);
    // Every sampled cell of the space costs something on every preset.
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(11);
    for _ in 0..50 {
        let spec = space.sample(&mut rng);
        for config in [NetworkConfig::cifar(), NetworkConfig::mobile()] {
            let r = network_cost(&spec, &config).unwrap();
            assert!(r.network.params_trainable > 0 && r.network.mult_adds > 0);
        }
    }
}

// ---------------------------------------------------------------- search space

/// The weight-sharing spaces sample add-only cells of their ops, every state as wide as the
/// cell (so a super-net's shapes do not depend on the sampled cell), and refuse concat.
#[test]
fn weight_sharing_spaces_add_only() {
    let enas = SearchSpace::enas();
    assert_eq!(
        enas.ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(" "),
        "sep_conv_3x3 sep_conv_5x5 avg_pool_3x3 max_pool_3x3 identity"
    );
    let shared = SearchSpace::nasnet().add_only();
    assert_eq!((shared.ops.len(), shared.combines.as_slice()), (13, [Combine::Add].as_slice()));
    let mut rng = SpaceRng::new(3);
    for space in [&enas, &shared] {
        space.validate().unwrap();
        for _ in 0..50 {
            let spec = space.sample(&mut rng);
            space.validate_spec(&spec).unwrap();
            let plan = NetworkConfig::cifar().plan(&spec).unwrap();
            for cell in &plan.cells {
                let f = cell.filter_size;
                assert!(cell.layout.states[2..].iter().all(|s| s.channels == f), "{spec}");
                assert!(cell.layout.concat.iter().all(|e| e.output.channels == f), "{spec}");
            }
        }
    }
    let mut with_concat = CellSpec::nasnet_a();
    with_concat.normal.blocks[1].combine = Combine::Concat;
    let err = shared.validate_spec(&with_concat).unwrap_err().to_string();
    assert!(err.contains("concat"), "{err}");
}

#[test]
fn action_grammar() {
    let space = SearchSpace::nasnet();
    assert_eq!(space.num_actions(), 50);
    let steps = space.steps();
    assert_eq!(steps.len(), 50);
    assert_eq!(steps[0].choices, 2);
    assert_eq!(steps[2].choices, 13);
    assert_eq!(steps[4].choices, 2);
    assert_eq!(steps[20].choices, 6); // block 4, first input
    assert_eq!(steps[25].cell, CellKind::Reduction);
    assert_eq!(steps[25].choices, 2);
    assert_eq!(steps[7].to_string(), "normal cell, block 1, left op");

    let nasnet_a = CellSpec::nasnet_a();
    let actions = space.encode(&nasnet_a).unwrap();
    expect![[r#"[0, 1, 11, 10, 0, 1, 1, 11, 10, 0, 0, 1, 4, 0, 0, 1, 1, 4, 4, 0, 0, 0, 10, 0, 0, 0, 1, 11, 12, 0, 0, 1, 5, 12, 0, 0, 1, 4, 11, 0, 3, 2, 0, 4, 0, 2, 0, 10, 5, 0]"#]]
    .assert_eq(&format!("{actions:?}"));
    let decoded = space.decode(&actions).unwrap();
    assert_eq!(decoded.normal.blocks, nasnet_a.normal.blocks);
    assert_eq!(decoded.reduction.blocks, nasnet_a.reduction.blocks);
    assert_eq!(decoded.normal.output, CellOutput::UnusedBlocks);
}

#[test]
fn space_size() {
    let space = SearchSpace::nasnet();
    // (2·3·4·5·6)² · 13^10 · 2^5 per cell.
    let per_cell = 720u128.pow(2) * 13u128.pow(10) * 2u128.pow(5);
    assert_eq!(space.cell_action_count(), Some(per_cell));
    let expected_log = 2.0 * (per_cell as f64).log10();
    assert!((space.log10_spec_action_count() - expected_log).abs() < 1e-9);
    assert!(space.cell_count_unordered_sides().unwrap() < per_cell);
    assert!(space.cell_count_unordered_sides().unwrap() > per_cell / 2u128.pow(5));
}

/// For a tiny space, count canonical classes by enumeration: B = 1 has no block
/// reordering, so the closed form is exact; for B = 2 it is an upper bound.
#[test]
fn canonical_counts_by_enumeration() {
    for (blocks, exact) in [(1, true), (2, false)] {
        let space = SearchSpace {
            num_blocks: blocks,
            ops: vec![Op::Identity, Op::MaxPool3x3, Op::SepConv3x3],
            combines: vec![Combine::Add, Combine::Concat],
        };
        let steps = space.steps();
        let per_cell = space.actions_per_cell();
        let mut classes = HashSet::new();
        let mut actions = vec![0usize; space.num_actions()];
        let total = space.cell_action_count().unwrap();
        for index in 0..total {
            let mut rest = index;
            for (a, step) in actions[..per_cell].iter_mut().zip(&steps) {
                *a = (rest % step.choices as u128) as usize;
                rest /= step.choices as u128;
            }
            let cell = space.decode(&actions).unwrap().normal;
            classes.insert(cell.canonical());
        }
        let bound = space.cell_count_unordered_sides().unwrap() as usize;
        if exact {
            assert_eq!(classes.len(), bound);
        } else {
            assert!(classes.len() < bound, "{} vs {bound}", classes.len());
        }
        assert!(classes.len() < total as usize);
    }
}

#[test]
fn sampling_is_seeded_valid_and_covers_the_space() {
    let space = SearchSpace::nasnet();
    let mut a = SpaceRng::new(7);
    let mut b = SpaceRng::new(7);
    assert_eq!(space.sample(&mut a), space.sample(&mut b));
    let mut rng = SpaceRng::new(1);
    let mut op_seen = HashSet::new();
    let mut combine_seen = HashSet::new();
    let mut last_input_seen = HashSet::new();
    for _ in 0..2000 {
        let spec = space.sample(&mut rng);
        space.validate_spec(&spec).unwrap();
        let actions = space.encode(&spec).unwrap();
        assert_eq!(space.decode(&actions).unwrap(), spec);
        for block in spec.normal.blocks.iter().chain(&spec.reduction.blocks) {
            op_seen.extend(block.ops);
            combine_seen.insert(block.combine);
        }
        last_input_seen.insert(spec.normal.blocks[4].inputs[0]);
    }
    assert_eq!(op_seen.len(), 13);
    assert_eq!(combine_seen.len(), 2);
    assert_eq!(last_input_seen.len(), 6);
}

#[test]
fn mutation_changes_exactly_one_decision() {
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(3);
    let mut kinds = [0usize; 3];
    let mut spec = CellSpec::nasnet_a();
    for _ in 0..3000 {
        let (child, mutation) = space.mutate(&spec, &mut rng).unwrap();
        space.validate_spec(&child).unwrap();
        let before = space.encode(&spec).unwrap();
        let after = space.encode(&child).unwrap();
        let diff: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
        assert_eq!(diff.len(), 1, "{mutation}");
        let step = space.steps()[diff[0]];
        assert_eq!((step.cell, step.block, step.side), (mutation.cell, mutation.block, mutation.side));
        match mutation.change {
            MutationChange::Input { from, to } => {
                kinds[0] += 1;
                assert_ne!(from, to);
                assert_eq!(after[diff[0]], to);
            }
            MutationChange::Op { from, to } => {
                kinds[1] += 1;
                assert_ne!(from, to);
            }
            MutationChange::Combine { from, to } => {
                kinds[2] += 1;
                assert_ne!(from, to);
                assert_eq!(child.cell(mutation.cell).blocks[mutation.block].combine, to);
            }
        }
        // The output rule is kept (NASNet-A's explicit lists survive mutation).
        assert_eq!(child.reduction.output, spec.reduction.output);
        spec = child;
    }
    // Each kind a third of the time (1,000 expected; 4 standard deviations is about 100).
    assert!(kinds.iter().all(|&k| (900..1100).contains(&k)), "{kinds:?}");
    // With a single op and a single combine, only inputs mutate.
    let one_op = SearchSpace { ops: vec![Op::SepConv3x3], ..SearchSpace::nasnet().add_only() };
    let spec = one_op.sample(&mut rng);
    for _ in 0..50 {
        let (_, m) = one_op.mutate(&spec, &mut rng).unwrap();
        assert!(matches!(m.change, MutationChange::Input { .. }));
    }
}

// ---------------------------------------------------------------- canonical form

/// FNV-1a's published 64-bit test vectors: every stable hash of the workspace is this one.
#[test]
fn fnv1a_gives_the_reference_values() {
    assert_eq!(crate::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(crate::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(crate::fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn canonical_hash_is_stable() {
    // A change of this value breaks every stored search cache: only change it on purpose.
    expect!["abbf85072d48b8b9"].assert_eq(&CellSpec::nasnet_a().canonical_hash().to_string());
}

#[test]
fn swapped_sides_dedupe() {
    let spec = CellSpec::nasnet_a();
    let mut swapped = spec.clone();
    for block in swapped.normal.blocks.iter_mut().chain(swapped.reduction.blocks.iter_mut()) {
        block.inputs.swap(0, 1);
        block.ops.swap(0, 1);
    }
    assert_ne!(spec, swapped);
    assert_eq!(spec.canonical_hash(), swapped.canonical_hash());
    assert_eq!(spec.canonical(), swapped.canonical());
}

#[test]
fn reordered_blocks_dedupe() {
    // NASNet-A's normal blocks 0..3 are independent: move block 3 first.
    let spec = CellSpec::nasnet_a();
    let mut moved = spec.clone();
    let b = moved.normal.blocks.remove(3);
    moved.normal.blocks.insert(0, b);
    // Old states 2, 3, 4 become 3, 4, 5 and old 5 becomes 2.
    moved.normal.output = CellOutput::Concat(vec![1, 3, 4, 5, 2, 6]);
    assert_ne!(spec, moved);
    assert_eq!(spec.canonical_hash(), moved.canonical_hash());
}

#[test]
fn unused_rule_equals_its_explicit_list_and_dead_blocks_are_ignored() {
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(5);
    let spec = space.sample(&mut rng);
    let mut explicit = spec.clone();
    explicit.normal.output = CellOutput::Concat(spec.normal.output_states());
    explicit.reduction.output = CellOutput::Concat(spec.reduction.output_states());
    assert_eq!(spec.canonical_hash(), explicit.canonical_hash());

    // A block that nothing reads and that is not concatenated is dead code.
    let mut dead = CellSpec::nasnet_a();
    dead.normal.output = CellOutput::Concat(vec![1, 2, 3, 4, 6]); // block 3 (state 5) is dead
    let mut other = dead.clone();
    other.normal.blocks[3] = Block::add((0, Op::Conv3x3), (1, Op::MaxPool7x7));
    assert_eq!(dead.canonical_hash(), other.canonical_hash());
    // ... but its combine still matters if it is the last block (its width sets the concat width).
    assert_ne!(dead.canonical_hash(), CellSpec::nasnet_a().canonical_hash());
}

/// Random equivalence-preserving rewrites of sampled cells never change the hash,
/// and different canonical forms never share a hash.
#[test]
fn canonical_hash_property() {
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(42);
    let mut by_hash = std::collections::HashMap::new();
    for _ in 0..500 {
        let spec = space.sample(&mut rng);
        let canonical = spec.canonical();
        assert_eq!(canonical.canonical(), canonical, "canonical form is idempotent");
        canonical.validate().unwrap();
        let rewritten = random_rewrite(&spec, &mut rng);
        assert_eq!(spec.canonical_hash(), rewritten.canonical_hash(), "{spec:?}\n{rewritten:?}");
        if let Some(previous) = by_hash.insert(spec.canonical_hash(), canonical.clone()) {
            assert_eq!(previous, canonical);
        }
        // Cost is a property of the network, so equivalent cells cost the same.
        let config = NetworkConfig::cifar();
        assert_eq!(network_cost(&spec, &config).unwrap().network, network_cost(&rewritten, &config).unwrap().network);
    }
    assert!(by_hash.len() > 490);
}

/// Swaps random sides and moves a random block to another legal position.
fn random_rewrite(spec: &CellSpec, rng: &mut SpaceRng) -> CellSpec {
    let mut out = spec.clone();
    for kind in CellKind::ALL {
        let cell = out.cell_mut(kind);
        cell.output = CellOutput::Concat(cell.output_states());
        for block in &mut cell.blocks {
            if rng.below(2) == 1 {
                block.inputs.swap(0, 1);
                block.ops.swap(0, 1);
            }
        }
        // Swap two adjacent blocks when the second does not read the first and the last
        // block keeps its combine.
        let n = cell.blocks.len();
        let i = rng.below(n - 1);
        let reads_first = cell.blocks[i + 1].inputs.contains(&(2 + i));
        let changes_last = i + 1 == n - 1 && cell.blocks[i].combine != cell.blocks[i + 1].combine;
        if !reads_first && !changes_last {
            cell.blocks.swap(i, i + 1);
            let swap = |s: usize| {
                if s == 2 + i {
                    3 + i
                } else if s == 3 + i {
                    2 + i
                } else {
                    s
                }
            };
            for block in &mut cell.blocks {
                block.inputs = block.inputs.map(swap);
            }
            if let CellOutput::Concat(states) = &mut cell.output {
                for s in states.iter_mut() {
                    *s = swap(*s);
                }
                states.reverse();
            }
        }
    }
    out
}

// ---------------------------------------------------------------- rng

#[test]
fn rng_stream_is_fixed() {
    let mut rng = SpaceRng::new(0);
    let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
    expect!["[5987356902031041503, 7051070477665621255, 6633766593972829180]"].assert_eq(&format!("{first:?}"));
    let saved = rng.state();
    let a: Vec<usize> = (0..5).map(|_| rng.below(13)).collect();
    let mut restored = SpaceRng::from_state(saved);
    let b: Vec<usize> = (0..5).map(|_| restored.below(13)).collect();
    assert_eq!(a, b);
}

#[test]
fn rng_below_is_uniform() {
    let mut rng = SpaceRng::new(9);
    let mut counts = [0usize; 6];
    let n = 60_000;
    for _ in 0..n {
        counts[rng.below(6)] += 1;
    }
    let expected = n as f64 / 6.0;
    let chi2: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
    // 5 degrees of freedom: p = 0.001 at 20.5.
    assert!(chi2 < 20.5, "{counts:?} chi2 = {chi2}");
    let u = rng.unit_f64();
    assert!((0.0..1.0).contains(&u));
}

// ---------------------------------------------------------------- errors, one per kind

fn cell(blocks: Vec<Block>, output: CellOutput) -> Cell {
    Cell { blocks, output }
}

#[test]
fn error_no_blocks() {
    let err = cell(vec![], CellOutput::UnusedBlocks).validate(CellKind::Normal).unwrap_err();
    assert!(matches!(err, SpecError::NoBlocks { cell: CellKind::Normal }));
    assert_eq!(err.to_string(), "normal cell has no blocks");
}

#[test]
fn error_input_out_of_range() {
    let mut spec = CellSpec::nasnet_a();
    spec.reduction.blocks[2].inputs[1] = 5;
    let err = spec.validate().unwrap_err();
    assert!(matches!(
        err,
        SpecError::InputOutOfRange { cell: CellKind::Reduction, block: 2, side: Side::Right, index: 5, available: 4 }
    ));
    assert_eq!(
        err.to_string(),
        "reduction cell, block 2: right input 5 is out of range (block 2 may read states 0..=3)"
    );
}

#[test]
fn error_concat_lists() {
    let blocks = CellSpec::nasnet_a().normal.blocks;
    let err = cell(blocks.clone(), CellOutput::Concat(vec![])).validate(CellKind::Normal).unwrap_err();
    assert!(matches!(err, SpecError::EmptyConcat { .. }));
    let err = cell(blocks.clone(), CellOutput::Concat(vec![2, 7])).validate(CellKind::Normal).unwrap_err();
    assert!(matches!(err, SpecError::ConcatOutOfRange { index: 7, num_states: 7, .. }), "{err}");
    let err = cell(blocks, CellOutput::Concat(vec![2, 3, 2])).validate(CellKind::Reduction).unwrap_err();
    assert!(matches!(err, SpecError::DuplicateConcat { cell: CellKind::Reduction, index: 2 }));
    assert_eq!(err.to_string(), "reduction cell: output state 2 is listed twice in the concat list");
}

#[test]
fn error_not_in_space() {
    let space = SearchSpace::with_blocks(4);
    let err = space.validate_spec(&CellSpec::nasnet_a()).unwrap_err();
    assert!(matches!(err, SpecError::BlockCount { cell: CellKind::Normal, expected: 4, found: 5 }));
    let space = SearchSpace { ops: vec![Op::SepConv3x3, Op::SepConv5x5, Op::Identity], ..SearchSpace::nasnet() };
    let err = space.validate_spec(&CellSpec::nasnet_a()).unwrap_err();
    assert!(matches!(err, SpecError::OpNotInSpace { block: 2, side: Side::Left, op: Op::AvgPool3x3, .. }), "{err}");
    assert_eq!(err.to_string(), "normal cell, block 2: left op `avg_pool_3x3` is not in the search space's op list");
    let space = SearchSpace { combines: vec![Combine::Concat], ..SearchSpace::nasnet() };
    let err = space.validate_spec(&CellSpec::nasnet_a()).unwrap_err();
    assert!(matches!(err, SpecError::CombineNotInSpace { block: 0, combine: Combine::Add, .. }));
}

#[test]
fn error_unknown_names() {
    let err = "sep_conv_9x9".parse::<Op>().unwrap_err();
    assert!(matches!(&err, SpecError::UnknownOp { name } if name == "sep_conv_9x9"));
    assert!(err.to_string().contains("known ops: identity, conv_1x3_3x1"));
    assert!(matches!("mul".parse::<Combine>().unwrap_err(), SpecError::UnknownCombine { .. }));
}

#[test]
fn error_actions() {
    let space = SearchSpace::nasnet();
    assert!(matches!(space.decode(&[0; 49]).unwrap_err(), SpecError::ActionCount { expected: 50, found: 49 }));
    let mut actions = space.encode(&CellSpec::nasnet_a()).unwrap();
    actions[5] = 2; // block 1, first input: choices 0..3
    assert!(space.decode(&actions).is_ok());
    actions[5] = 3;
    let err = space.decode(&actions).unwrap_err();
    assert!(matches!(err, SpecError::ActionOutOfRange { step: 5, value: 3, choices: 3, .. }));
    assert_eq!(err.to_string(), "action 5 (normal cell, block 1, left input) is 3, but that step has only 3 choices");
}

#[test]
fn error_invalid_space() {
    for space in [
        SearchSpace::with_blocks(0),
        SearchSpace { ops: vec![], ..SearchSpace::nasnet() },
        SearchSpace { combines: vec![], ..SearchSpace::nasnet() },
        SearchSpace { ops: vec![Op::Identity, Op::Identity], ..SearchSpace::nasnet() },
    ] {
        assert!(matches!(space.validate().unwrap_err(), SpecError::InvalidSpace { .. }));
    }
}

#[test]
fn error_config_fields() {
    let spec = CellSpec::nasnet_a();
    let check = |edit: &dyn Fn(&mut NetworkConfig), field: &str| {
        let mut config = NetworkConfig::cifar();
        edit(&mut config);
        let err = config.plan(&spec).unwrap_err();
        assert!(matches!(&err, SpecError::Config { field: f, .. } if *f == field), "{field}: {err}");
    };
    check(&|c| c.n = 0, "n");
    check(&|c| c.num_conv_filters = 0, "num_conv_filters");
    check(&|c| c.drop_path_keep_prob = 0.0, "drop_path_keep_prob");
    check(&|c| c.dense_dropout_keep_prob = 1.5, "dense_dropout_keep_prob");
    check(&|c| c.num_classes = 0, "num_classes");
    check(&|c| c.bn_decay = 1.0, "bn_decay");
    check(&|c| c.bn_epsilon = f64::NAN, "bn_epsilon");
    check(&|c| c.stem_multiplier = -1.0, "stem_multiplier");
    // F = 2 leaves the first ImageNet stem cell int(2 / 4) = 0 filters.
    let mut config = NetworkConfig::mobile();
    config.num_conv_filters = 2;
    let err = config.plan(&spec).unwrap_err();
    assert!(err.to_string().contains("cell_stem_0 no filters"), "{err}");
}

#[test]
fn error_net_size() {
    let spec = CellSpec::nasnet_a();
    let err = NetworkConfig::parse_net("5@1538", &spec).unwrap_err();
    assert!(matches!(err, SpecError::NetSize { .. }));
    assert!(err.to_string().contains("nearest: 1536 (F = 64) or 1560 (F = 65)"), "{err}");
    for bad in ["4x1056", "a@1056", "4@", "tiny:4@1056", "0@1056"] {
        let err = NetworkConfig::parse_net(bad, &spec).unwrap_err();
        assert!(matches!(err, SpecError::NetSize { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(bad.split(':').next_back().unwrap()), "{bad}: {err}");
    }
}

#[test]
fn error_shape_aux_head_on_small_maps() {
    let mut config = NetworkConfig::mobile();
    config.image_size = 32; // the aux head would see 2×2
    let err = config.plan(&CellSpec::nasnet_a()).unwrap_err();
    assert!(matches!(err, SpecError::Shape { .. }));
    assert!(err.to_string().contains("use_aux_head"), "{err}");
}

/// timm `nasnetalarge(num_features=384, stem_size=32, num_classes=10)`: 918,366 parameters.
/// timm is the Large skeleton (`skip_reduction_layer_input`).
#[test]
fn cost_matches_timm_small_large_skeleton() {
    let mut config = NetworkConfig::parse_net("large:6@384", &CellSpec::nasnet_a()).unwrap();
    config.stem_multiplier = 1.0;
    config.num_classes = 10;
    let r = network_cost(&CellSpec::nasnet_a(), &config).unwrap();
    assert_eq!(r.network.params_trainable, 918_366);
}
