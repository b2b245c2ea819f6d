//! A cell's output: its states concatenated along channels, with the blocks whose sum only
//! feeds the concatenation added straight into it.
//!
//! Candle's `cat` copies on the calling thread, and a block's sum was stored only to be
//! copied into the concatenation. On the CPU with no gradient to track (inside
//! `nas_ops::no_grad`, or no input tracks one), [`cat_channels`] writes every channel plane
//! of the output once, in parallel: a copy, or the sum of a block's two branches. Otherwise
//! it is the plain candle ops (its reference).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Device, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::Output;

const NAME: &str = "cat-channels";

/// One part of the concatenation: a tensor, or the sum of two of the same shape.
#[derive(Debug, Clone)]
pub enum Part {
    /// Copied as is.
    Copy(Tensor),
    /// `a + b`, never stored on its own by [`cat_channels`] on the CPU.
    Sum(Tensor, Tensor),
}

impl Part {
    /// The part's value as one tensor.
    pub fn value(&self) -> Result<Tensor> {
        match self {
            Part::Copy(xs) => Ok(xs.clone()),
            Part::Sum(a, b) => a + b,
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Part::Copy(xs) => vec![xs],
            Part::Sum(a, b) => vec![a, b],
        }
    }
}

/// `cat([part.value() for part in parts], 1)`.
///
/// # Shapes
/// - every part: `(batch, c_i, h, w)`, the same batch, height and width
/// - returns: `(batch, Σ c_i, h, w)`
pub fn cat_channels(parts: &[Part]) -> Result<Tensor> {
    let (first, channels) = widths(parts)?;
    let all: Vec<&Tensor> = parts.iter().flat_map(Part::tensors).collect();
    let tracked = crate::grad_enabled() && all.iter().any(|t| t.track_op());
    let fast_dtype = matches!(first.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if !matches!(first.device(), Device::Cpu) || !fast_dtype || tracked {
        return cat_channels_reference(parts);
    }
    let (storage, shape) = concat_cpu(parts, &first, &channels)?;
    Ok(Tensor::from_storage(Storage::Cpu(storage), shape, candle_core::op::BackpropOp::none(), false))
}

/// The first part's first tensor and every part's width, after checking that the parts
/// share batch, height and width.
fn widths(parts: &[Part]) -> Result<(Tensor, Vec<usize>)> {
    let Some(first) = parts.first() else { bail!("{NAME}: nothing to concatenate") };
    let first = first.tensors()[0].clone();
    let (n, _, h, w) = first.dims4()?;
    let mut channels = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let ts = part.tensors();
        let (pn, c, ph, pw) = ts[0].dims4()?;
        if (pn, ph, pw) != (n, h, w) || ts.iter().any(|t| t.dims() != ts[0].dims()) {
            let shapes: Vec<_> = ts.iter().map(|t| t.dims().to_vec()).collect();
            bail!("{NAME}: part {i} has shape {shapes:?}, expected ({n}, C, {h}, {w})")
        }
        channels.push(c);
    }
    Ok((first, channels))
}

/// [`cat_channels`] on the CPU (f32 or f64) as a storage, for ops that concatenate inside
/// them; nothing recorded.
pub(crate) fn cat_channels_cpu(parts: &[Part]) -> Result<(CpuStorage, Shape)> {
    let (first, channels) = widths(parts)?;
    concat_cpu(parts, &first, &channels)
}

/// [`cat_channels_cpu`] once [`widths`] has checked the parts.
fn concat_cpu(parts: &[Part], first: &Tensor, channels: &[usize]) -> Result<(CpuStorage, Shape)> {
    let (n, _, h, w) = first.dims4()?;
    let all: Vec<Tensor> = parts.iter().flat_map(Part::tensors).map(Tensor::contiguous).collect::<Result<_>>()?;
    let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
    let storages = guards
        .iter()
        .map(|(s, _)| match &**s {
            Storage::Cpu(s) => Ok(s),
            _ => bail!("{NAME}: expected every part on the CPU"),
        })
        .collect::<Result<Vec<&CpuStorage>>>()?;
    let offsets: Vec<usize> = guards.iter().map(|(_, l)| l.start_offset()).collect();
    let geometry = Geometry { n, plane: h * w, channels, parts };
    let shape = Shape::from((n, channels.iter().sum::<usize>(), h, w));
    let storage = match storages[0] {
        CpuStorage::F32(_) => CpuStorage::F32(geometry.run::<f32>(&storages, &offsets)?),
        CpuStorage::F64(_) => CpuStorage::F64(geometry.run::<f64>(&storages, &offsets)?),
        s => bail!("{NAME}: unsupported dtype {:?}, expected f32 or f64", s.dtype()),
    };
    Ok((storage, shape))
}

/// Reference for [`cat_channels`] from plain candle ops (differentiable, any device).
pub fn cat_channels_reference(parts: &[Part]) -> Result<Tensor> {
    let values = parts.iter().map(Part::value).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&values, 1)
}

/// The gradient of a [`cat_channels`] output split into each part's channels: `widths[i]`
/// channels each, contiguous, in one parallel pass (CPU, f32 or f64).
///
/// # Shapes
/// - `grad`: `(batch, Σ widths, h, w)`
/// - returns: `(batch, widths[i], h, w)` for every `i`
pub(crate) fn split_channels(grad: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let (n, c, h, w) = grad.dims4()?;
    if widths.iter().sum::<usize>() != c {
        bail!("{NAME}: cannot split {c} channels into {widths:?}")
    }
    let grad = grad.contiguous()?;
    let (storage, layout) = grad.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { bail!("{NAME}: expected a gradient on the CPU") };
    fn split<T: WithDType>(data: &[T], (n, c, plane): (usize, usize, usize), widths: &[usize]) -> Vec<Vec<T>> {
        let mut first = 0;
        widths
            .iter()
            .map(|&width| {
                let mut out = Output::<T>::new(n * width * plane);
                if plane > 0 {
                    out.par_chunks_mut(plane).with_min_len(4096usize.div_ceil(plane)).enumerate().for_each(
                        |(p, out)| {
                            let (sample, ch) = (p / width, p % width);
                            let at = (sample * c + first + ch) * plane;
                            out.copy_from_slice(&data[at..at + plane]);
                        },
                    );
                }
                first += width;
                out.into_vec()
            })
            .collect()
    }
    fn tensors<T: WithDType>(
        data: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
        widths: &[usize],
    ) -> Result<Vec<Tensor>> {
        let parts = split(data, (n, c, h * w), widths);
        parts.into_iter().zip(widths).map(|(v, &width)| Tensor::from_vec(v, (n, width, h, w), &Device::Cpu)).collect()
    }
    let start = layout.start_offset();
    match storage {
        CpuStorage::F32(data) => tensors(&data[start..], (n, c, h, w), widths),
        CpuStorage::F64(data) => tensors(&data[start..], (n, c, h, w), widths),
        s => bail!("{NAME}: unsupported dtype {:?}, expected f32 or f64", s.dtype()),
    }
}

struct Geometry<'a> {
    n: usize,
    plane: usize,
    channels: &'a [usize],
    parts: &'a [Part],
}

impl Geometry<'_> {
    fn run<T: WithDType>(&self, storages: &[&CpuStorage], offsets: &[usize]) -> Result<Vec<T>> {
        // The data of every tensor, in `Part::tensors` order.
        let data: Vec<&[T]> = storages
            .iter()
            .zip(offsets)
            .map(|(s, &start)| Ok(&s.as_slice::<T>()?[start..]))
            .collect::<Result<_>>()
            .map_err(|e: candle_core::Error| {
                candle_core::Error::Msg(format!("{NAME}: the parts' dtypes differ: {e}"))
            })?;
        // For every output channel: its part's first tensor, whether it is a sum, its channel
        // within the part and the part's width.
        let mut sources = Vec::new();
        let mut first = 0;
        for (part, &c) in self.parts.iter().zip(self.channels) {
            let sum = matches!(part, Part::Sum(..));
            sources.extend((0..c).map(|ch| (first, sum, ch, c)));
            first += if sum { 2 } else { 1 };
        }
        let c_total = sources.len();
        let len = self.n * c_total * self.plane;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out = Output::<T>::new(len);
        let plane = self.plane;
        out.par_chunks_mut(plane).with_min_len(4096usize.div_ceil(plane)).enumerate().for_each(|(p, out)| {
            let (sample, channel) = (p / c_total, p % c_total);
            let (t, sum, ch, c) = sources[channel];
            let at = (sample * c + ch) * plane;
            let a = &data[t][at..at + plane];
            if sum {
                let b = &data[t + 1][at..at + plane];
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = x + y;
                }
            } else {
                out.copy_from_slice(a);
            }
        });
        Ok(out.into_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use candle_core::{DType, Var};

    fn parts(rng: &mut TestRng, dtype: DType, widths: &[(usize, bool)], n: usize, h: usize, w: usize) -> Vec<Part> {
        widths
            .iter()
            .map(|&(c, sum)| {
                let a = rng.tensor(&[n, c, h, w], dtype).unwrap();
                if sum {
                    Part::Sum(a, rng.tensor(&[n, c, h, w], dtype).unwrap())
                } else {
                    Part::Copy(a)
                }
            })
            .collect()
    }

    #[test]
    fn matches_the_reference() {
        let mut rng = TestRng::new(41);
        let layouts: [&[(usize, bool)]; 4] =
            [&[(3, true)], &[(2, false), (3, true), (1, false)], &[(4, true), (4, true), (5, false)], &[(1, false)]];
        for dtype in [DType::F32, DType::F64] {
            for (n, h, w) in [(2, 3, 5), (1, 1, 1), (3, 8, 8), (2, 40, 33)] {
                for layout in layouts {
                    let ps = parts(&mut rng, dtype, layout, n, h, w);
                    let what = format!("{dtype:?} {n}x{h}x{w} {layout:?}");
                    let got = cat_channels(&ps).unwrap();
                    let want = cat_channels_reference(&ps).unwrap();
                    assert_close(&got, &want, 0.0, &what);
                }
            }
        }
    }

    #[test]
    fn split_channels_gives_each_parts_slice() {
        let mut rng = TestRng::new(45);
        for dtype in [DType::F32, DType::F64] {
            for (n, h, w) in [(2, 3, 5), (1, 1, 1), (3, 40, 33)] {
                let widths = [3, 1, 4];
                let grad = rng.tensor(&[n, 8, h, w], dtype).unwrap();
                let parts = split_channels(&grad, &widths).unwrap();
                let mut first = 0;
                for (part, &c) in parts.iter().zip(&widths) {
                    assert!(part.is_contiguous());
                    assert_close(part, &grad.narrow(1, first, c).unwrap(), 0.0, &format!("{dtype:?} {n}x{h}x{w}"));
                    first += c;
                }
            }
        }
        let grad = rng.tensor(&[2, 5, 3, 3], DType::F32).unwrap();
        let err = split_channels(&grad, &[2, 2]).unwrap_err().to_string();
        assert!(err.contains("cannot split 5 channels into [2, 2]"), "{err}");
    }

    #[test]
    fn strided_parts_are_read_as_their_values() {
        let mut rng = TestRng::new(42);
        let a = rng.tensor(&[2, 3, 5, 4], DType::F32).unwrap().transpose(2, 3).unwrap();
        let b = rng.tensor(&[2, 3, 4, 5], DType::F32).unwrap();
        let c = rng.tensor(&[2, 2, 7, 4], DType::F32).unwrap().narrow(2, 1, 5).unwrap().transpose(2, 3).unwrap();
        let ps = [Part::Sum(a, b.clone()), Part::Copy(c), Part::Copy(b)];
        assert_close(&cat_channels(&ps).unwrap(), &cat_channels_reference(&ps).unwrap(), 0.0, "strided");
    }

    #[test]
    fn gradients_flow_through_the_reference_path() {
        let mut rng = TestRng::new(43);
        let a = Var::from_tensor(&rng.tensor(&[2, 3, 4, 4], DType::F32).unwrap()).unwrap();
        let b = rng.tensor(&[2, 3, 4, 4], DType::F32).unwrap();
        let out = cat_channels(&[Part::Sum(a.as_tensor().clone(), b.clone()), Part::Copy(b)]).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let ga = grads.get(a.as_tensor()).expect("a gradient for the summed part");
        assert_close(ga, &a.as_tensor().ones_like().unwrap(), 0.0, "d sum / d a");
    }

    #[test]
    fn mismatched_parts_are_named() {
        let mut rng = TestRng::new(44);
        let a = rng.tensor(&[2, 3, 4, 4], DType::F32).unwrap();
        let b = rng.tensor(&[2, 3, 4, 5], DType::F32).unwrap();
        let err = cat_channels(&[Part::Copy(a.clone()), Part::Copy(b.clone())]).unwrap_err().to_string();
        assert!(err.contains("cat-channels: part 1") && err.contains("[2, 3, 4, 5]"), "{err}");
        let err = cat_channels(&[Part::Sum(a, b)]).unwrap_err().to_string();
        assert!(err.contains("part 0"), "{err}");
        let f64s = rng.tensor(&[2, 3, 4, 4], DType::F64).unwrap();
        let f32s = rng.tensor(&[2, 3, 4, 4], DType::F32).unwrap();
        let err = cat_channels(&[Part::Copy(f32s), Part::Copy(f64s)]).unwrap_err().to_string();
        assert!(err.contains("cat-channels"), "{err}");
        assert!(cat_channels(&[]).unwrap_err().to_string().contains("nothing to concatenate"));
    }
}
