//! The paper's published figures for NASNet-A (Zoph et al., "Learning Transferable
//! Architectures for Scalable Image Recognition", CVPR 2018, Tables 1–3), to print beside the
//! figures counted here or measured in training.
//!
//! One table, [`NASNET_A`]; [`published`] finds the row of a (cell, skeleton) pair. The figures
//! are kept at the paper's precision, and [`Reference::params_text`] and
//! [`Reference::mult_adds_text`] print them as the paper does (`5.3M`, `564M`, `23.8B`).

use std::fmt;

use crate::{CellSpec, NetworkConfig};

/// How the paper measured a model's accuracy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accuracy {
    /// ImageNet, single crop: top-1 and top-5 accuracy in percent.
    ImageNet { top1: f64, top5: f64 },
    /// CIFAR-10: test error in percent (mean of 5 runs), without and with cutout.
    Cifar10 { error: f64, error_with_cutout: f64 },
}

/// One published NASNet-A model and the paper's figures for it.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    /// The model's name: `NASNet-A Mobile`.
    pub name: &'static str,
    /// The skeleton it stacks NASNet-A into (a preset of [`NetworkConfig`]).
    pub network: fn() -> NetworkConfig,
    /// The paper's table.
    pub table: u8,
    /// Parameters, as published.
    pub params: f64,
    /// Whether the published count includes the BN moving statistics (Large's 88.9M does;
    /// its trainable count is 88.75M).
    pub params_include_bn_statistics: bool,
    /// Mult-adds per image at the skeleton's input size, as published (none for CIFAR-10).
    pub mult_adds: Option<f64>,
    /// The published accuracy.
    pub accuracy: Accuracy,
}

/// NASNet-A Mobile, 4 @ 1056 at 224×224 (Table 3).
pub const NASNET_A_MOBILE: Reference = Reference {
    name: "NASNet-A Mobile",
    network: NetworkConfig::mobile,
    table: 3,
    params: 5.3e6,
    params_include_bn_statistics: false,
    mult_adds: Some(564e6),
    accuracy: Accuracy::ImageNet { top1: 74.0, top5: 91.6 },
};

/// NASNet-A Large, 6 @ 4032 at 331×331 (Table 2).
pub const NASNET_A_LARGE: Reference = Reference {
    name: "NASNet-A Large",
    network: NetworkConfig::large,
    table: 2,
    params: 88.9e6,
    params_include_bn_statistics: true,
    mult_adds: Some(23.8e9),
    accuracy: Accuracy::ImageNet { top1: 82.7, top5: 96.2 },
};

/// NASNet-A on CIFAR-10, 6 @ 768 (Table 1).
pub const NASNET_A_CIFAR: Reference = Reference {
    name: "NASNet-A CIFAR-10",
    network: NetworkConfig::cifar,
    table: 1,
    params: 3.3e6,
    params_include_bn_statistics: false,
    mult_adds: None,
    accuracy: Accuracy::Cifar10 { error: 3.41, error_with_cutout: 2.65 },
};

/// Every published NASNet-A model this workspace builds.
pub const NASNET_A: [Reference; 3] = [NASNET_A_MOBILE, NASNET_A_LARGE, NASNET_A_CIFAR];

/// The published model that `spec` in `config` is, if any: NASNet-A in one of the skeletons
/// of [`NASNET_A`], unchanged (the same classes and input size).
pub fn published(spec: &CellSpec, config: &NetworkConfig) -> Option<&'static Reference> {
    if *spec != CellSpec::nasnet_a() {
        return None;
    }
    NASNET_A.iter().find(|r| (r.network)() == *config)
}

impl Reference {
    /// The skeleton as the paper writes it, with the input side: `4 @ 1056, 224`.
    pub fn skeleton(&self) -> String {
        let config = (self.network)();
        format!("{} @ {}, {}", config.n, config.penultimate_filters(&CellSpec::nasnet_a()), config.image_size)
    }

    /// The parameters at the paper's precision: `5.3M`.
    pub fn params_text(&self) -> String {
        paper_number(self.params)
    }

    /// The mult-adds at the paper's precision: `564M`, `23.8B`.
    pub fn mult_adds_text(&self) -> Option<String> {
        self.mult_adds.map(paper_number)
    }

    /// ImageNet top-1 accuracy in percent (none for CIFAR-10).
    pub fn top1(&self) -> Option<f64> {
        match self.accuracy {
            Accuracy::ImageNet { top1, .. } => Some(top1),
            Accuracy::Cifar10 { .. } => None,
        }
    }
}

impl fmt::Display for Reference {
    /// `NASNet-A Mobile (4 @ 1056, 224): 5.3M parameters, 564M mult-adds (Table 3)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {} parameters", self.name, self.skeleton(), self.params_text())?;
        if self.params_include_bn_statistics {
            f.write_str(" with BN statistics")?;
        }
        if let Some(madds) = self.mult_adds_text() {
            write!(f, ", {madds} mult-adds")?;
        }
        write!(f, " (Table {})", self.table)
    }
}

impl fmt::Display for Accuracy {
    /// `74.0 % top-1, 91.6 % top-5` or `3.41 % test error (2.65 % with cutout)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Accuracy::ImageNet { top1, top5 } => write!(f, "{top1:.1} % top-1, {top5:.1} % top-5"),
            Accuracy::Cifar10 { error, error_with_cutout } => {
                write!(f, "{error:.2} % test error ({error_with_cutout:.2} % with cutout)")
            }
        }
    }
}

/// A count as the paper prints it: one decimal in millions below 100M, none above, one
/// decimal in billions.
fn paper_number(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.1}B", x / 1e9)
    } else if x >= 1e8 {
        format!("{:.0}M", x / 1e6)
    } else {
        format!("{:.1}M", x / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;
    use crate::cost::network_cost;

    /// The cost model, rounded as the paper rounds, gives every published figure.
    #[test]
    fn the_cost_model_rounds_to_the_published_figures() {
        for r in &NASNET_A {
            let cost = network_cost(&CellSpec::nasnet_a(), &(r.network)()).unwrap().network;
            let params = if r.params_include_bn_statistics { cost.params_total() } else { cost.params_trainable };
            assert_eq!(paper_number(params as f64), r.params_text(), "{}", r.name);
            if let Some(madds) = r.mult_adds_text() {
                assert_eq!(paper_number(cost.mult_adds as f64), madds, "{}", r.name);
            }
        }
    }

    #[test]
    fn published_finds_only_nasnet_a_in_an_unchanged_skeleton() {
        let spec = CellSpec::nasnet_a();
        for r in &NASNET_A {
            assert_eq!(published(&spec, &(r.network)()).map(|p| p.name), Some(r.name));
        }
        let mobile_1001 = NetworkConfig { num_classes: 1001, ..NetworkConfig::mobile() };
        assert!(published(&spec, &mobile_1001).is_none());
        let mut other = spec.clone();
        other.normal.blocks.swap(0, 1);
        assert!(published(&other, &NetworkConfig::mobile()).is_none());
    }

    #[test]
    fn figures_print_as_the_paper_prints_them() {
        let lines: Vec<String> = NASNET_A.iter().map(|r| format!("{r}; {}", r.accuracy)).collect();
        expect![[r#"
            NASNet-A Mobile (4 @ 1056, 224): 5.3M parameters, 564M mult-adds (Table 3); 74.0 % top-1, 91.6 % top-5
            NASNet-A Large (6 @ 4032, 331): 88.9M parameters with BN statistics, 23.8B mult-adds (Table 2); 82.7 % top-1, 96.2 % top-5
            NASNet-A CIFAR-10 (6 @ 768, 32): 3.3M parameters (Table 1); 3.41 % test error (2.65 % with cutout)"#]]
        .assert_eq(&lines.join("\n"));
    }
}
