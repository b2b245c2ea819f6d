//! The instruction set the CPU kernels' inner loops run with, chosen at run time.
//!
//! The crate is compiled for baseline x86-64 (SSE2): plain loops vectorise four f32 wide,
//! with a separate multiply and add. The hot loops are written once, as `#[inline(always)]`
//! bodies generic over `const FMA: bool`, and [`multiversion!`] instantiates each inside
//! `#[target_feature]` wrappers for AVX2 + FMA and for AVX-512. [`Isa::detect`] picks the
//! widest the CPU has, so one binary runs on any x86-64 machine (a Slurm node need not
//! match the login node) and still uses 512-bit fused multiply-adds where they exist.
//! On other architectures the body is compiled once, for the target's own features.

use std::sync::OnceLock;

/// The float types of the CPU kernels (f32 and f64).
pub(crate) trait Float: candle_core::WithDType + PartialOrd {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// `a * b + c`: one fused multiply-add when `FMA` (only inside a wrapper that enables
    /// the `fma` feature; elsewhere it would be a slow libm call), else a multiply and an add.
    fn madd<const FMA: bool>(a: Self, b: Self, c: Self) -> Self;
}

macro_rules! impl_float {
    ($($t:ty),*) => {$(
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn madd<const FMA: bool>(a: Self, b: Self, c: Self) -> Self {
                if FMA {
                    a.mul_add(b, c)
                } else {
                    a * b + c
                }
            }
        }
    )*};
}

impl_float!(f32, f64);

/// An instruction set this CPU is known to have. The field is private: a value comes only
/// from [`Isa::detect`] or [`Isa::available`], which check the CPU, so the `unsafe` calls
/// into `#[target_feature]` code made on its word are sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Isa(Level);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// The compile-time target's features only.
    Baseline,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512F with AVX2 and FMA.
    Avx512,
}

impl Isa {
    /// The widest instruction set this CPU has (detected once per process).
    pub(crate) fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| *Isa::available().last().expect("the baseline is always available"))
    }

    /// Every instruction set this CPU can run, narrowest first (for tests and benchmarks,
    /// which compare the variants).
    pub(crate) fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut levels = vec![Isa(Level::Baseline)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                levels.push(Isa(Level::Avx2));
                if is_x86_feature_detected!("avx512f") {
                    levels.push(Isa(Level::Avx512));
                }
            }
        }
        levels
    }

    pub(crate) fn level(self) -> Level {
        self.0
    }
}

/// Defines `fn $name<T: Float>(isa: Isa, args...)`, which runs `$body::<T, FMA>(args...)`
/// compiled for the instruction set `isa` names. `$body` must be `#[inline(always)]` so
/// that it is compiled inside each wrapper.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: $crate::kernels::simd::Float>(isa: $crate::kernels::simd::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::kernels::simd::Level;
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<T: $crate::kernels::simd::Float>($($arg: $ty),*) {
                    $body::<T, true>($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512<T: $crate::kernels::simd::Float>($($arg: $ty),*) {
                    $body::<T, true>($($arg),*)
                }
                match isa.level() {
                    // SAFETY: an `Isa` is only made by `Isa::available`, after checking
                    // that this CPU has the features the wrapper enables.
                    Level::Avx512 => return unsafe { avx512::<T>($($arg),*) },
                    Level::Avx2 => return unsafe { avx2::<T>($($arg),*) },
                    Level::Baseline => {}
                }
            }
            let _ = isa;
            $body::<T, false>($($arg),*)
        }
    };
}

pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(always)]
    fn dot_body<T: Float, const FMA: bool>(a: &[T], b: &[T], out: &mut T) {
        *out = a.iter().zip(b).fold(T::ZERO, |acc, (&x, &y)| T::madd::<FMA>(x, y, acc));
    }

    multiversion!(fn dot(a: &[T], b: &[T], out: &mut T) => dot_body);

    #[test]
    fn every_available_isa_computes_the_same_dot_product() {
        let a: Vec<f64> = (0..37).map(|i| i as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..37).map(|i| 1.0 - i as f64 * 0.25).collect();
        let expected: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let isas = Isa::available();
        assert_eq!(isas[0].level(), Level::Baseline);
        assert_eq!(Isa::detect(), *isas.last().unwrap());
        for isa in isas {
            let mut out = 0.0;
            dot(isa, &a, &b, &mut out);
            assert!((out - expected).abs() < 1e-9, "{isa:?}: {out} vs {expected}");
        }
    }
}
