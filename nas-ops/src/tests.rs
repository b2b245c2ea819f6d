//! Network-level tests: run-time parameter counts against the `nas-space` cost model,
//! endpoint shapes against the plan, timm's weight names, drop path, BN statistics and
//! deterministic initialisation.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use nas_space::cost::network_cost;
use nas_space::{CellSpec, NetworkConfig, SearchSpace, SpaceRng};

use crate::drop_path::{DropPath, DropPathSchedule};
use crate::init::init_weights;
use crate::kernels::testutil::{assert_close, TestRng};
use crate::NasNet;

fn build(spec: &CellSpec, config: &NetworkConfig) -> (VarMap, NasNet) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = NasNet::new(spec, config, 0, vb).unwrap();
    init_weights(&varmap, 1).unwrap();
    (varmap, net)
}

/// (trainable, BN statistics) of the network and of the aux head, from the VarMap.
fn counts(varmap: &VarMap) -> ((u64, u64), (u64, u64)) {
    let mut main = (0, 0);
    let mut aux = (0, 0);
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let n = var.elem_count() as u64;
        let slot = if name.starts_with("aux_head.") { &mut aux } else { &mut main };
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            slot.1 += n;
        } else {
            slot.0 += n;
        }
    }
    (main, aux)
}

/// A small CIFAR child: N = 1, F = 8, aux head on (16×16 at the aux cell).
fn tiny_cifar() -> NetworkConfig {
    let mut config = NetworkConfig::cifar();
    config.n = 1;
    config.num_conv_filters = 8;
    config
}

/// The `small` benchmark network (`nas bench --net small`): Keras 3's
/// `NASNet(input_shape=(32,32,3), penultimate_filters=384, num_blocks=2,
/// stem_block_filters=32, skip_reduction=False, filter_multiplier=2, classes=10)`.
fn small_imagenet() -> NetworkConfig {
    let mut config = NetworkConfig::parse_net("mobile:2@384", &CellSpec::nasnet_a()).unwrap();
    config.image_size = 32;
    config.num_classes = 10;
    config.use_aux_head = false;
    config.dense_dropout_keep_prob = 1.0;
    config
}

#[test]
fn parameter_counts_equal_the_cost_model() {
    let spec = CellSpec::nasnet_a();
    for config in [tiny_cifar(), small_imagenet()] {
        let (varmap, _) = build(&spec, &config);
        let report = network_cost(&spec, &config).unwrap();
        let ((trainable, stats), (aux_trainable, aux_stats)) = counts(&varmap);
        assert_eq!((trainable, stats), (report.network.params_trainable, report.network.bn_statistics));
        let aux = report.aux_head.unwrap_or_default();
        assert_eq!((aux_trainable, aux_stats), (aux.params_trainable, aux.bn_statistics));
    }
    // Keras counts the small network as 373,558 parameters including BN statistics.
    let (varmap, _) = build(&spec, &small_imagenet());
    let ((trainable, stats), _) = counts(&varmap);
    assert_eq!(trainable + stats, 373_558);
}

#[test]
fn random_cells_build_with_the_cost_models_count_and_run() {
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(3);
    let mut config = tiny_cifar();
    config.use_aux_head = false;
    config.image_size = 8;
    let xs = TestRng::new(5).tensor(&[2, 3, 8, 8], DType::F32).unwrap();
    for _ in 0..10 {
        let spec = space.sample(&mut rng);
        let (varmap, net) = build(&spec, &config);
        let report = network_cost(&spec, &config).unwrap();
        let ((trainable, stats), _) = counts(&varmap);
        assert_eq!((trainable, stats), (report.network.params_trainable, report.network.bn_statistics), "{spec}");
        let out = net.forward_t(&xs, true).unwrap();
        assert_eq!(out.logits.dims(), &[2, 10]);
        // Every cell must also train: the backward pass of every op at every stride.
        let grads = out.logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                assert_eq!(g.dims(), var.dims(), "{name} of {spec}");
            }
        }
        let outputs = net.forward_outputs(&xs, false).unwrap();
        for (t, shape) in outputs.iter().zip(&net.plan().outputs) {
            assert_eq!(t.dims(), &[2, shape.channels, shape.size, shape.size], "{spec}");
        }
        // Without gradients (cells one sample at a time where their ops allow, detached
        // outputs): the same logits up to f32 rounding (the program adds in another order),
        // and no gradient reaches a cell's weights through them.
        let eval = net.forward_t(&xs, false).unwrap().logits;
        let fast = crate::no_grad(|| net.forward_t(&xs, false)).unwrap().logits;
        assert_close(&fast, &eval, 1e-5, &format!("no_grad logits of {spec}"));
        let grads = fast.sum_all().unwrap().backward().unwrap();
        let mut checked = 0;
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.contains("cell_") {
                assert!(grads.get(var.as_tensor()).is_none(), "{name} of {spec} got a gradient through no_grad");
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} cell weights checked");
    }
}

#[test]
fn endpoint_shapes_follow_the_plan() {
    let spec = CellSpec::nasnet_a();
    let (_, net) = build(&spec, &small_imagenet());
    let xs = TestRng::new(1).tensor(&[2, 3, 32, 32], DType::F32).unwrap();
    let outputs = net.forward_outputs(&xs, true).unwrap();
    assert_eq!(outputs.len(), net.plan().outputs.len());
    let dims: Vec<Vec<usize>> = outputs.iter().map(|t| t.dims().to_vec()).collect();
    // conv0 32 → 15, stem cells 8 and 4, then 4 → 2 → 1 (Keras's spatial sizes).
    assert_eq!(dims[0], vec![2, 32, 15, 15]);
    assert_eq!(dims[1], vec![2, 16, 8, 8]);
    assert_eq!(dims[2], vec![2, 32, 4, 4]);
    assert_eq!(dims.last().unwrap(), &vec![2, 384, 1, 1]);
    for (t, shape) in outputs.iter().zip(&net.plan().outputs) {
        assert_eq!(t.dims(), &[2, shape.channels, shape.size, shape.size]);
    }
}

#[test]
fn aux_head_only_in_training_and_every_weight_gets_a_gradient() {
    let spec = CellSpec::nasnet_a();
    let (varmap, net) = build(&spec, &tiny_cifar());
    let xs = TestRng::new(2).tensor(&[2, 3, 32, 32], DType::F32).unwrap();
    let out = net.forward_t(&xs, true).unwrap();
    let aux = out.aux_logits.expect("aux logits while training");
    assert_eq!(aux.dims(), &[2, 10]);
    assert!(net.forward_t(&xs, false).unwrap().aux_logits.is_none());
    let loss = (out.logits.sqr().unwrap().sum_all().unwrap() + aux.sqr().unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            assert!(grads.get(var.as_tensor()).is_none(), "{name} must not be trained");
            continue;
        }
        match grads.get(var.as_tensor()) {
            Some(g) if g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0 => {}
            _ => missing.push(name.clone()),
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn timm_weight_names() {
    let mut config = NetworkConfig::parse_net("large:6@384", &CellSpec::nasnet_a()).unwrap();
    config.stem_multiplier = 1.0;
    config.num_classes = 10;
    config.use_aux_head = false;
    let (varmap, _) = build(&CellSpec::nasnet_a(), &config);
    let shapes: HashMap<String, Vec<usize>> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    // Names and shapes from timm `nasnetalarge(num_features=384, stem_size=32)` (F = 16).
    for (name, shape) in [
        ("conv0.conv.weight", vec![32, 3, 3, 3]),
        ("conv0.bn.running_var", vec![32]),
        ("cell_stem_0.conv_1x1.conv.weight", vec![4, 32, 1, 1]),
        ("cell_stem_0.comb_iter_0_right.separable_1.depthwise_conv2d.weight", vec![32, 1, 7, 7]),
        ("cell_stem_0.comb_iter_0_right.separable_1.pointwise_conv2d.weight", vec![4, 32, 1, 1]),
        ("cell_stem_0.comb_iter_0_right.bn_sep_1.weight", vec![4]),
        ("cell_stem_1.path_1.conv.weight", vec![4, 32, 1, 1]),
        ("cell_stem_1.path_2.conv.weight", vec![4, 32, 1, 1]),
        ("cell_stem_1.final_path_bn.weight", vec![8]),
        ("cell_0.path_1.conv.weight", vec![8, 16, 1, 1]),
        ("cell_0.conv_1x1.conv.weight", vec![16, 32, 1, 1]),
        ("cell_1.conv_prev_1x1.conv.weight", vec![16, 32, 1, 1]),
        ("cell_1.comb_iter_4_left.separable_2.depthwise_conv2d.weight", vec![16, 1, 3, 3]),
        ("reduction_cell_0.conv_prev_1x1.conv.weight", vec![32, 96, 1, 1]),
        ("cell_6.path_2.conv.weight", vec![16, 96, 1, 1]),
        ("reduction_cell_1.comb_iter_1_right.separable_2.pointwise_conv2d.weight", vec![64, 64, 1, 1]),
        ("cell_17.comb_iter_0_left.bn_sep_2.running_mean", vec![64]),
        ("last_linear.weight", vec![10, 384]),
        ("last_linear.bias", vec![10]),
    ] {
        assert_eq!(shapes.get(name), Some(&shape), "{name}");
    }
    // Pools and identities have no weights in NASNet-A's standard cells.
    assert!(!shapes.keys().any(|k| k.contains("comb_iter_2_left.") && k.starts_with("cell_1.")));
    let ((trainable, _), _) = counts(&varmap);
    assert_eq!(trainable, 918_366);
}

#[test]
fn drop_path_keep_schedule_and_masks() {
    let schedule = DropPathSchedule::new(7);
    let last = DropPath::new(schedule.clone(), 19, 20, 0.6);
    let first = DropPath::new(schedule.clone(), 0, 20, 0.6);
    assert_eq!(last.keep(), 1.0);
    schedule.set_progress(0.5);
    assert!((last.keep() - 0.8).abs() < 1e-12);
    schedule.set_progress(1.0);
    assert!((last.keep() - 0.6).abs() < 1e-12);
    assert!((first.keep() - (1.0 - 0.4 / 20.0)).abs() < 1e-12);
    let xs = Tensor::ones((400, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let ys = last.apply(&xs).unwrap();
    let per_example: Vec<f32> = ys.flatten_from(1).unwrap().mean(1).unwrap().to_vec1().unwrap();
    let kept = per_example.iter().filter(|&&v| v > 0.0).count();
    assert!(per_example.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.6).abs() < 1e-5));
    assert!((200..280).contains(&kept), "{kept} of 400 kept at keep 0.6");
    // Whole examples are dropped: every element of an example shares the mask.
    let flat: Vec<Vec<f32>> = ys.flatten_from(1).unwrap().to_vec2().unwrap();
    assert!(flat.iter().all(|row| row.iter().all(|&v| v == row[0])));
}

#[test]
fn bn_statistics_move_in_training_only() {
    let spec = CellSpec::nasnet_a();
    let (varmap, net) = build(&spec, &tiny_cifar());
    let read = |name: &str| -> Vec<f32> { varmap.data().lock().unwrap()[name].as_tensor().to_vec1().unwrap() };
    let before = read("conv0.bn.running_mean");
    let xs = (TestRng::new(3).tensor(&[4, 3, 32, 32], DType::F32).unwrap() + 2.0).unwrap();
    net.forward_t(&xs, false).unwrap();
    assert_eq!(read("conv0.bn.running_mean"), before);
    net.forward_t(&xs, true).unwrap();
    let after = read("conv0.bn.running_mean");
    assert_ne!(after, before);
    // decay 0.9: one step moves the running mean by a tenth of the batch mean.
    assert!(after.iter().any(|v| v.abs() > 1e-4));
}

/// A training step's forward through the taped cells (gradients on: the separable convs
/// traced by `kernels::separable_train`) and through the unfused ops (under `no_grad`) gives the same
/// logits and moves every moving statistic, the separable convs' included, the same way.
#[test]
fn fused_separable_training_matches_the_unfused_ops_and_statistics() {
    let spec = CellSpec::nasnet_a();
    let (fused_map, fused) = build(&spec, &tiny_cifar());
    let (plain_map, plain) = build(&spec, &tiny_cifar());
    let xs = TestRng::new(5).tensor(&[3, 3, 32, 32], DType::F32).unwrap();
    let a = fused.forward_t(&xs, true).unwrap().logits;
    let b = crate::no_grad(|| plain.forward_t(&xs, true)).unwrap().logits;
    assert_close(&a, &b, 1e-4, "logits");
    let stats = |map: &VarMap| -> Vec<(String, Tensor)> {
        let data = map.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .filter(|(k, _)| k.contains("running_"))
            .map(|(k, t)| (k.clone(), t.as_tensor().clone()))
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (fused_stats, plain_stats) = (stats(&fused_map), stats(&plain_map));
    assert!(fused_stats.iter().any(|(k, _)| k.contains("bn_sep_2.running_var")));
    for ((name, x), (_, y)) in fused_stats.iter().zip(&plain_stats) {
        assert_close(x, y, 1e-4, name);
    }
}

#[test]
fn initialisation_is_deterministic_and_fan_out_scaled() {
    let spec = CellSpec::nasnet_a();
    let (a, _) = build(&spec, &small_imagenet());
    let (b, _) = build(&spec, &small_imagenet());
    let get = |m: &VarMap, name: &str| -> Vec<f32> {
        m.data().lock().unwrap()[name].as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    let name = "cell_5.comb_iter_0_left.separable_2.pointwise_conv2d.weight";
    assert_eq!(get(&a, name), get(&b, name));
    init_weights(&b, 2).unwrap();
    assert_ne!(get(&a, name), get(&b, name));
    // Pointwise 64 → 64: fan_out = 64, std ≈ sqrt(2 / 64) after truncation.
    let w = get(&a, "cell_5.comb_iter_0_left.separable_2.pointwise_conv2d.weight");
    let std = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std / (2.0f64 / 64.0).sqrt() - 1.0).abs() < 0.1, "std {std}");
    let bound = 2.0 * (1.3 * 2.0 / 64.0f64).sqrt();
    assert!(w.iter().all(|v| (*v as f64).abs() <= bound + 1e-6));
    assert!(get(&a, "cell_5.comb_iter_0_left.bn_sep_2.weight").iter().all(|&v| v == 1.0));
}

#[test]
fn wrong_input_shape_is_a_clear_error() {
    let (_, net) = build(&CellSpec::nasnet_a(), &small_imagenet());
    let xs = Tensor::zeros((1, 3, 31, 31), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward_t(&xs, false).unwrap_err().to_string();
    assert!(err.contains("expected input (batch, 3, 32, 32)"), "{err}");
}

/// The fixture from `tests/fixtures/gen_timm_small.py`: timm's
/// `nasnetalarge(num_features=384, stem_size=32, num_classes=10)` with random weights and
/// BN statistics, eval mode, on a (2, 3, 64, 64) input, its stride-2 avg pools patched to
/// TF semantics. Loading its state dict by name and running our network must give its logits.
#[test]
fn timm_checkpoint_loads_and_matches_timm_logits() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/timm_small.safetensors");
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let input = tensors.remove("__input__").unwrap();
    let expected = tensors.remove("__logits__").unwrap();
    let mut config = NetworkConfig::parse_net("large:6@384", &CellSpec::nasnet_a()).unwrap();
    config.stem_multiplier = 1.0;
    config.num_classes = 10;
    config.use_aux_head = false;
    config.image_size = 64;
    let (varmap, net) = build(&CellSpec::nasnet_a(), &config);
    let report = crate::checkpoint::load_weights(&varmap, &tensors).unwrap();
    assert_eq!(report.loaded, tensors.len());
    let logits = net.forward_t(&input, false).unwrap().logits;
    crate::kernels::testutil::assert_close(&logits, &expected, 1e-4, "logits vs timm");
    // Without gradients, as `nas infer` runs it (one-pass concatenation, separable convs one
    // sample at a time).
    let logits = crate::no_grad(|| net.forward_t(&input, false)).unwrap().logits;
    crate::kernels::testutil::assert_close(&logits, &expected, 1e-4, "no_grad logits vs timm");

    // A checkpoint for another width names every problem.
    tensors.remove("last_linear.bias");
    tensors.insert("extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    tensors.insert("conv0.conv.weight".into(), Tensor::zeros((8, 3, 3, 3), DType::F32, &Device::Cpu).unwrap());
    let err = crate::checkpoint::load_weights(&varmap, &tensors).unwrap_err().to_string();
    assert!(err.contains("1 missing: last_linear.bias"), "{err}");
    assert!(err.contains("conv0.conv.weight: checkpoint [8, 3, 3, 3], network [32, 3, 3, 3]"), "{err}");
    assert!(err.contains("1 extra: extra.weight"), "{err}");
}

/// A strided convolution of any kernel shape equals the stride-1 convolution subsampled,
/// forward and backward (candle's own conv2d backward gets the width wrong for 1×7 at
/// stride 2; `Conv2d` must not).
#[test]
fn strided_convolutions_of_any_kernel_shape_have_the_right_gradients() {
    use candle_nn::Module;

    use crate::kernels::Padding2d;
    use crate::layers::{Conv2d, Conv2dConfig};
    for (kh, kw) in [(1, 7), (7, 1), (1, 3), (3, 1), (3, 3), (5, 5)] {
        for size in [7, 15, 16] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let cfg = Conv2dConfig { c_in: 3, c_out: 4, kh, kw, stride: 2, dilation: 1, same: true };
            let conv = Conv2d::new(cfg, vb.pp("conv")).unwrap();
            let weight = varmap.data().lock().unwrap()["conv.weight"].clone();
            weight.set(&TestRng::new(kh as u64 * 10 + kw as u64).tensor(&[4, 3, kh, kw], DType::F64).unwrap()).unwrap();
            let xs = candle_core::Var::from_tensor(
                &TestRng::new(size as u64).tensor(&[2, 3, size, size], DType::F64).unwrap(),
            )
            .unwrap();
            let ys = conv.forward(xs.as_tensor()).unwrap();
            // Reference: TF SAME padding for stride 2, a stride-1 convolution, every other output.
            let pad = Padding2d::same(size, size, kh, kw, 2, 1);
            let padded = xs
                .as_tensor()
                .pad_with_zeros(2, pad.top, pad.bottom)
                .unwrap()
                .pad_with_zeros(3, pad.left, pad.right)
                .unwrap();
            let dense = padded.conv2d(weight.as_tensor(), 0, 1, 1, 1).unwrap();
            let out = size.div_ceil(2);
            let pick = Tensor::arange_step(0u32, 2 * out as u32, 2, &Device::Cpu).unwrap();
            let reference = dense.index_select(&pick, 2).unwrap().index_select(&pick, 3).unwrap();
            assert_eq!(ys.dims(), &[2, 4, out, out]);
            let diff = (&ys - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "{kh}x{kw} at {size}: forward differs by {diff}");
            let upstream = TestRng::new(99).tensor(&[2, 4, out, out], DType::F64).unwrap();
            let g = (&ys * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let g_ref = (&reference * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [xs.as_tensor(), weight.as_tensor()] {
                let (a, b) = (g.get(var).unwrap(), g_ref.get(var).unwrap());
                assert_eq!(a.dims(), var.dims(), "{kh}x{kw} at {size}");
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(diff < 1e-10, "{kh}x{kw} at {size}: gradient differs by {diff}");
            }
        }
    }
}

/// The gradient of a whole network's loss (training mode, batch statistics) against central
/// finite differences in f64, for a sample of the weights, on the ImageNet skeleton (odd
/// feature-map sizes, 1×1 maps at the end) and the CIFAR skeleton. The step is small (1e-7)
/// because a larger one crosses ReLU kinks somewhere in the network and the difference
/// quotient then averages two slopes (at 1e-5 that gave relative errors near 1e-2).
#[test]
fn whole_network_gradients_match_finite_differences() {
    let cases = [
        ("imagenet", small_imagenet(), 29),
        ("imagenet", small_imagenet(), 40),
        ("cifar", tiny_cifar(), 16),
        ("cifar", tiny_cifar(), 9),
    ];
    for (name, mut config, size) in cases {
        config.image_size = size;
        config.use_aux_head = false;
        config.drop_path_keep_prob = 1.0;
        config.dense_dropout_keep_prob = 1.0;
        if name == "imagenet" {
            config.num_conv_filters = 4;
            config.n = 1;
        } else {
            config.num_conv_filters = 4;
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let net = NasNet::new(&CellSpec::nasnet_a(), &config, 0, vb).unwrap();
        init_weights(&varmap, 1).unwrap();
        let xs = TestRng::new(7).tensor(&[3, 3, size, size], DType::F64).unwrap();
        let target = TestRng::new(8).tensor(&[3, config.num_classes], DType::F64).unwrap();
        let loss_of = || -> f64 {
            let logits = net.forward_t(&xs, true).unwrap().logits;
            (logits * &target).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let logits = net.forward_t(&xs, true).unwrap().logits;
        let grads = (logits * &target).unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap().clone();
        let mut names: Vec<&String> = data.keys().filter(|n| !n.contains("running_")).collect();
        names.sort();
        let mut worst = (0.0f64, String::new());
        for (k, var_name) in names.iter().enumerate() {
            if k % 7 != 0 && !var_name.starts_with("conv0") && !var_name.starts_with("last_linear") {
                continue; // a sample of the variables keeps the test fast
            }
            let var = &data[*var_name];
            let g = grads.get(var.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
            let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let index = (values.len() * 31 / 97) % values.len();
            let eps = 1e-7;
            let set = |delta: f64| {
                let mut v = values.clone();
                v[index] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
            };
            set(eps);
            let up = loss_of();
            set(-eps);
            let down = loss_of();
            set(0.0);
            let numeric = (up - down) / (2.0 * eps);
            let analytic = g.map_or(0.0, |g| g[index]);
            let err = (numeric - analytic).abs() / (1e-3 + numeric.abs().max(analytic.abs()));
            if err > worst.0 {
                worst = (err, format!("{var_name}[{index}]: numeric {numeric:.6e}, analytic {analytic:.6e}"));
            }
        }
        assert!(worst.0 < 1e-3, "{name} at {size}: worst gradient {}", worst.1);
    }
}

/// Every custom kernel against its reference on feature maps no larger than the kernel
/// (a 5×5 or 7×7 window on 4×4, 2×2 and 1×1 maps, as deep ImageNet cells on small images
/// have), forward and both gradients.
#[test]
fn kernels_match_their_references_on_maps_smaller_than_the_window() {
    use crate::kernels::depthwise::{depthwise_conv2d, depthwise_conv2d_reference};
    use crate::kernels::pool::{pool2d, pool2d_reference, PoolKind, PoolOptions};
    use crate::kernels::testutil::hw;
    use crate::kernels::{ConvOptions, Padding2d};
    let max_diff = |a: &Tensor, b: &Tensor| -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    };
    for size in [1usize, 2, 3, 4, 5] {
        for k in [3usize, 5, 7] {
            for stride in [1usize, 2] {
                for dilation in [1usize, 2] {
                    let x = candle_core::Var::from_tensor(
                        &TestRng::new(size as u64).tensor(&[2, 3, size, size], DType::F64).unwrap(),
                    )
                    .unwrap();
                    let w = candle_core::Var::from_tensor(
                        &TestRng::new(k as u64).tensor(&[3, 1, k, k], DType::F64).unwrap(),
                    )
                    .unwrap();
                    let opts = ConvOptions::same((size, size), (k, k), stride, dilation);
                    let ours = depthwise_conv2d(x.as_tensor(), w.as_tensor(), opts).unwrap();
                    let reference = depthwise_conv2d_reference(x.as_tensor(), w.as_tensor(), opts).unwrap();
                    let what = format!("depthwise k{k} s{stride} d{dilation} on {size}x{size}");
                    assert!(max_diff(&ours, &reference) < 1e-12, "{what}: forward");
                    let up = TestRng::new(3).tensor(ours.dims(), DType::F64).unwrap();
                    let g1 = (&ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (&reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    for (v, n) in [(x.as_tensor(), "input"), (w.as_tensor(), "weight")] {
                        assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-10, "{what}: {n} gradient");
                    }
                }
                if k > 3 && k != 5 && k != 7 {
                    continue;
                }
                let x =
                    candle_core::Var::from_tensor(&TestRng::new(9).tensor(&[2, 3, size, size], DType::F64).unwrap())
                        .unwrap();
                let pad = Padding2d::same(size, size, k, k, stride, 1);
                for (name, ours, reference) in [
                    (
                        "max",
                        pool2d(x.as_tensor(), PoolOptions::same(PoolKind::Max, k, stride, hw(x.as_tensor()))).unwrap(),
                        pool2d_reference(x.as_tensor(), PoolOptions::max(k, stride, pad)).unwrap(),
                    ),
                    (
                        "avg",
                        pool2d(x.as_tensor(), PoolOptions::same(PoolKind::Avg, k, stride, hw(x.as_tensor()))).unwrap(),
                        pool2d_reference(x.as_tensor(), PoolOptions::avg(k, stride, pad)).unwrap(),
                    ),
                ] {
                    let what = format!("{name} pool k{k} s{stride} on {size}x{size}");
                    assert!(max_diff(&ours, &reference) < 1e-12, "{what}: forward");
                    let up = TestRng::new(4).tensor(ours.dims(), DType::F64).unwrap();
                    let g1 = (&ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = (&reference * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(
                        max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-10,
                        "{what}: gradient"
                    );
                }
            }
        }
    }
}

/// The fan-in rescaling of the classifiers gives them std ≈ sqrt(1 / fan_in) and leaves every
/// other variable as TF-Slim's rule drew it.
#[test]
fn classifiers_rescale_to_fan_in() {
    let (varmap, _) = build(&CellSpec::nasnet_a(), &tiny_cifar());
    let before: HashMap<String, Vec<f32>> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    crate::init::rescale_classifiers_fan_in(&varmap).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let after: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        if name == "last_linear.weight" || name == "aux_head.fc.weight" {
            let fan_in = var.dims()[1] as f64;
            let std = (after.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / after.len() as f64).sqrt();
            assert!((std * fan_in.sqrt() - 1.0).abs() < 0.2, "{name}: std {std:.4} for fan-in {fan_in}");
        } else {
            assert_eq!(after, before[name], "{name} changed");
        }
    }
}

/// A search proposal whose normal cell leaves state 0 (the newest input after the preamble)
/// unused by its ops and out of its concatenation: the last cell's `x` gets no gradient
/// through the cell, which a taped cell must still answer (with zeros) for candle's backward.
const STATE_0_UNUSED: &str = r#"{"format": "nas-space/cellspec", "version": 1,
  "normal": {"blocks": [
    {"inputs": [1, 1], "ops": ["sep_conv_3x3", "conv_1x3_3x1"], "combine": "add"},
    {"inputs": [2, 2], "ops": ["max_pool_5x5", "avg_pool_3x3"], "combine": "concat"},
    {"inputs": [2, 3], "ops": ["identity", "max_pool_3x3"], "combine": "concat"},
    {"inputs": [3, 2], "ops": ["dil_conv_3x3", "conv_3x3"], "combine": "concat"},
    {"inputs": [4, 1], "ops": ["sep_conv_3x3", "max_pool_7x7"], "combine": "concat"}], "output": "unused"},
  "reduction": {"blocks": [
    {"inputs": [0, 1], "ops": ["conv_3x3", "conv_1x1"], "combine": "concat"},
    {"inputs": [1, 1], "ops": ["conv_1x1", "conv_1x7_7x1"], "combine": "add"},
    {"inputs": [3, 2], "ops": ["sep_conv_3x3", "conv_1x7_7x1"], "combine": "concat"},
    {"inputs": [2, 4], "ops": ["max_pool_3x3", "conv_1x1"], "combine": "concat"},
    {"inputs": [4, 2], "ops": ["conv_1x3_3x1", "conv_3x3"], "combine": "concat"}], "output": "unused"}}"#;

/// Training through the taped cells (`cell::CellModule`'s one-node path) against the same
/// network as candle ops (`with_unfused_cells`), in f64 with drop path active: the logits, the
/// gradient of every weight and of the input, and every moving statistic agree. Covers
/// NASNet-A and random cells (dense convs through `Tape::record_candle`, pools with
/// projections, strided identities, concatenating blocks), on the CIFAR skeleton (with the aux
/// head) and the ImageNet one (odd sizes).
#[test]
fn taped_cells_train_like_the_candle_ops() {
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(11);
    let mut specs = vec![CellSpec::nasnet_a(), CellSpec::from_json(STATE_0_UNUSED).unwrap()];
    specs.extend((0..5).map(|_| space.sample(&mut rng)));
    let mut imagenet = small_imagenet();
    (imagenet.image_size, imagenet.num_conv_filters, imagenet.n) = (19, 8, 1);
    let mut cifar = tiny_cifar();
    cifar.image_size = 12;
    for (name, mut config) in [("cifar", cifar), ("imagenet", imagenet)] {
        config.drop_path_keep_prob = 0.6;
        config.dense_dropout_keep_prob = 1.0;
        for spec in &specs {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
            let net = NasNet::new(spec, &config, 3, vb).unwrap();
            init_weights(&varmap, 2).unwrap();
            net.drop_path().set_progress(0.8);
            let xs = candle_core::Var::from_tensor(
                &TestRng::new(9).tensor(&[3, 3, config.image_size, config.image_size], DType::F64).unwrap(),
            )
            .unwrap();
            let vars: Vec<(String, candle_core::Var)> = {
                let data = varmap.data().lock().unwrap();
                let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            let start: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
            let rng_state = net.drop_path().rng_state();
            let run = |unfused: bool| {
                for ((_, var), value) in vars.iter().zip(&start) {
                    var.set(value).unwrap();
                }
                net.drop_path().set_rng_state(rng_state);
                let forward = || net.forward_t(xs.as_tensor(), true).unwrap();
                let out = if unfused { crate::cell::with_unfused_cells(forward) } else { forward() };
                let target = TestRng::new(10).tensor(out.logits.dims(), DType::F64).unwrap();
                let mut loss = (&out.logits * &target).unwrap().sum_all().unwrap();
                if let Some(aux) = &out.aux_logits {
                    loss = (loss + (aux * 0.4).unwrap().sum_all().unwrap()).unwrap();
                }
                let grads = loss.backward().unwrap();
                let mut results = vec![("logits".to_string(), out.logits.clone())];
                results.push(("d input".to_string(), grads.get(xs.as_tensor()).unwrap().clone()));
                for (name, var) in &vars {
                    let value = match name.contains("running_") {
                        true => var.as_tensor().copy().unwrap(),
                        false => grads.get(var.as_tensor()).map_or_else(|| var.zeros_like().unwrap(), |g| g.clone()),
                    };
                    results.push((name.clone(), value));
                }
                results
            };
            let (taped, plain) = (run(false), run(true));
            assert_ne!(rng_state, net.drop_path().rng_state(), "drop path drew masks");
            for ((what, a), (_, b)) in taped.iter().zip(&plain) {
                assert_close(a, b, 1e-9, &format!("{name} {spec}: {what}"));
            }
        }
    }
}

/// Inference one sample at a time (`cell::CellModule::eval_program`, `kernels::cell_eval`)
/// against the cells as candle ops: every cell's output, in f32 and f64, with random moving
/// statistics (the batch norms folded into the 1×1 weights). Covers NASNet-A, a cell that
/// leaves state 0 unused (and concatenates the unadjusted state 1), and random cells (pools
/// with projections, strided identities, concatenating blocks, 1×1 convs; cells with
/// other dense convs have no program and run as candle ops), on the CIFAR skeleton and the
/// ImageNet one (odd sizes; the last cells' outputs 2 wide, the channels-last depthwise
/// path).
#[test]
fn per_sample_cells_infer_like_the_candle_ops() {
    let space = SearchSpace::nasnet();
    let mut rng = SpaceRng::new(12);
    let mut specs = vec![CellSpec::nasnet_a(), CellSpec::from_json(STATE_0_UNUSED).unwrap()];
    // Random cells with their dense convs (which have no per-sample steps) replaced by ops
    // that have, except in the last two (which run as candle ops).
    let substitutes =
        [nas_space::Op::Conv1x1, nas_space::Op::MaxPool5x5, nas_space::Op::SepConv7x7, nas_space::Op::AvgPool3x3];
    for i in 0..8 {
        let mut spec = space.sample(&mut rng);
        for (j, op) in [&mut spec.normal, &mut spec.reduction]
            .into_iter()
            .flat_map(|cell| cell.blocks.iter_mut().flat_map(|b| b.ops.iter_mut()))
            .enumerate()
        {
            let dense = matches!(op.kind(), nas_space::OpKind::Conv(chain) if chain != [(1, 1, 1)]);
            if dense && i < 6 {
                *op = substitutes[j % substitutes.len()];
            }
        }
        specs.push(spec);
    }
    let mut imagenet = small_imagenet();
    (imagenet.image_size, imagenet.num_conv_filters, imagenet.n) = (27, 8, 1);
    let mut cifar = tiny_cifar();
    cifar.image_size = 12;
    let mut programs = 0;
    for (name, config) in [("cifar", cifar), ("imagenet", imagenet)] {
        for spec in &specs {
            for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
                let net = NasNet::new(spec, &config, 3, vb).unwrap();
                init_weights(&varmap, 2).unwrap();
                let mut stats = TestRng::new(13);
                for (key, var) in varmap.data().lock().unwrap().iter() {
                    let noise = stats.tensor(var.dims(), dtype).unwrap();
                    if key.ends_with("running_var") {
                        var.set(&(noise.abs().unwrap() + 0.5).unwrap()).unwrap();
                    } else if key.ends_with("running_mean") || key.ends_with("bn.bias") || key.contains("bn_sep") {
                        var.set(&(noise * 0.3).unwrap()).unwrap();
                    }
                }
                let xs = TestRng::new(9).tensor(&[3, 3, config.image_size, config.image_size], dtype).unwrap();
                let outputs =
                    crate::no_grad(|| crate::cell::with_unfused_cells(|| net.forward_outputs(&xs, false))).unwrap();
                for (i, (cell, plan)) in net.cells().iter().zip(&net.plan().cells).enumerate() {
                    let (x, prev) = (&outputs[plan.x], plan.prev.map(|p| &outputs[p]));
                    let Some(program) = crate::no_grad(|| cell.eval_program(x, prev)).unwrap() else { continue };
                    programs += 1;
                    let got = program.run(x, prev).unwrap();
                    assert_close(&got, &outputs[i + 1], tol, &format!("{name} {spec} {dtype:?}: cell {i}"));
                }
                let logits = |unfused: bool| {
                    let forward = || crate::no_grad(|| net.forward_t(&xs, false)).unwrap().logits;
                    if unfused {
                        crate::cell::with_unfused_cells(forward)
                    } else {
                        forward()
                    }
                };
                assert_close(&logits(false), &logits(true), tol, &format!("{name} {spec} {dtype:?}: logits"));
            }
        }
    }
    // NASNet-A's and the six substituted cells' (5 + 7 cells each), in both dtypes.
    assert_eq!(programs, 7 * 12 * 2, "cells that ran as programs");
}
