//! Evaluation: loss, top-1 and top-5 accuracy in eval mode (BN moving statistics, no drop
//! path, no dropout, no aux head).

use candle_core::Tensor;
use nas_data::{Batch, DataError};
use nas_ops::NasNet;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy (no label smoothing).
    pub loss: f64,
    /// Fraction of images whose highest logit is their label.
    pub top1: f64,
    /// Fraction of images whose label is among the five highest logits.
    pub top5: f64,
    /// Images evaluated.
    pub images: usize,
    /// Images the data set failed to produce (skipped and counted).
    pub skipped: usize,
}

/// Runs `net` in eval mode over `batches`.
pub fn evaluate(
    net: &NasNet,
    batches: impl Iterator<Item = Result<Batch, DataError>>,
) -> Result<EvalMetrics, TrainError> {
    let (mut loss_sum, mut top1, mut top5, mut images, mut skipped) = (0.0, 0usize, 0usize, 0usize, 0usize);
    for batch in batches {
        let batch = batch?;
        skipped += batch.skipped;
        let logits = crate::on_pool(|| nas_ops::no_grad(|| net.forward_t(&batch.images, false)))?.logits;
        let n = batch.labels.dim(0)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * n as f64;
        let (t1, t5) = top_k_hits(&logits, &batch.labels)?;
        top1 += t1;
        top5 += t5;
        images += n;
    }
    if images == 0 {
        return Err(TrainError::Config { field: "eval data", message: "produced no images".into() });
    }
    let n = images as f64;
    Ok(EvalMetrics { loss: loss_sum / n, top1: top1 as f64 / n, top5: top5 as f64 / n, images, skipped })
}

/// Counts the rows whose label has rank 0 (top-1) and rank < 5 (top-5) among its logits;
/// ties count against the label, so a constant output is never "right".
pub fn top_k_hits(logits: &Tensor, labels: &Tensor) -> candle_core::Result<(usize, usize)> {
    let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let labels = labels.to_vec1::<u32>()?;
    let (mut t1, mut t5) = (0, 0);
    for (row, &label) in rows.iter().zip(&labels) {
        let target = row[label as usize];
        let rank = row.iter().enumerate().filter(|&(j, &v)| j != label as usize && v >= target).count();
        t1 += usize::from(rank == 0);
        t5 += usize::from(rank < 5);
    }
    Ok((t1, t5))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn top_k_by_hand() {
        let logits =
            Tensor::new(&[[0.1f32, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], &Device::Cpu)
                .unwrap();
        // Row 0: label 1 is the best; row 1: all tied, so label 0 ranks last.
        assert_eq!(top_k_hits(&logits, &Tensor::new(&[1u32, 0], &Device::Cpu).unwrap()).unwrap(), (1, 1));
        // Row 0, label 3 (0.2): 0.9, 0.5, 0.4, 0.3 are higher: rank 4, in the top 5 but not top 1.
        assert_eq!(top_k_hits(&logits, &Tensor::new(&[3u32, 0], &Device::Cpu).unwrap()).unwrap(), (0, 1));
        // Row 0, label 2 (0.0): rank 6.
        assert_eq!(top_k_hits(&logits, &Tensor::new(&[2u32, 0], &Device::Cpu).unwrap()).unwrap(), (0, 0));
    }
}
