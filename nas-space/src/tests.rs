//! Golden and property tests of the grammar, the search space and the cost model.

use crate::cost::network_cost;
use crate::{CellSpec, NetworkConfig};

#[test]
fn cost_mobile() {
    let r = network_cost(&CellSpec::nasnet_a(), &NetworkConfig::mobile()).unwrap();
    println!("{r}");
    assert_eq!(r.network.params_trainable, 5_289_978);
    assert_eq!(r.network.params_total(), 5_326_716);
}

#[test]
fn cost_large() {
    let r = network_cost(&CellSpec::nasnet_a(), &NetworkConfig::large()).unwrap();
    println!("{r}");
    assert_eq!(r.network.params_trainable, 88_753_150);
    assert_eq!(r.network.params_total(), 88_949_818);
}

#[test]
fn cost_cifar() {
    let r = network_cost(&CellSpec::nasnet_a(), &NetworkConfig::cifar()).unwrap();
    println!("{r}");
    assert_eq!(r.network.params_trainable, 3_346_538);
}

#[test]
fn keras_rows() {
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
        println!("{p} {n} {skip}: {} {}", r.network.params_total(), r.network.params_trainable);
        assert_eq!((r.network.params_total(), r.network.params_trainable), (total, trainable));
    }
}
