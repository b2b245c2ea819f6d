//! Batching into candle tensors with a background prefetch thread: the only module that knows tensors.
//!
//! A [`Batcher`] owns a data set, a [`Transform`] and a [`BatchConfig`]. [`Batcher::epoch`] starts
//! one producer thread for the epoch, which decodes and augments each batch in parallel with rayon
//! and sends it through a bounded channel holding at most `prefetch` finished batches, so the training
//! loop finds the next batch ready whenever the CPUs keep up. Dropping the [`Epoch`] early stops the
//! producer.
//!
//! Order: with `shuffle`, the epoch's permutation comes from the seeded [`DataRng`] stream of
//! `(seed, epoch)`; each item's augmentation from the stream of `(seed, epoch, index)`. The same seed
//! and epoch give identical batches whatever the thread count or prefetch depth.
//!
//! Items the data set fails to produce (a corrupt or unreadable image file) are skipped: the batch
//! holding them comes out smaller, a batch whose every item failed is left out, and the
//! [`EpochSummary`] at the end of the epoch counts them and keeps the first few messages. The run
//! never dies on one bad file; only a failure to make a tensor ends an epoch with an error.

use std::fmt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::thousands;
use crate::rng::{stream, DataRng};
use crate::{DataError, Dataset, Transform};

/// How a [`Batcher`] cuts and orders an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchConfig {
    /// Items per batch (at least 1).
    pub batch_size: usize,
    /// Shuffle the items each epoch (from `seed` and the epoch number); otherwise data-set order.
    pub shuffle: bool,
    /// Leave out the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// Finished batches that may wait in the channel ahead of the training loop (0: the producer
    /// hands each batch over as soon as it is asked for, preparing at most one ahead).
    pub prefetch: usize,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
}

impl BatchConfig {
    /// Training: shuffled, last partial batch dropped, two batches prefetched.
    pub fn train(batch_size: usize, seed: u64) -> BatchConfig {
        BatchConfig { batch_size, shuffle: true, drop_last: true, prefetch: 2, seed }
    }

    /// Evaluation: data-set order, every item, two batches prefetched.
    pub fn eval(batch_size: usize) -> BatchConfig {
        BatchConfig { batch_size, shuffle: false, drop_last: false, prefetch: 2, seed: 0 }
    }
}

/// One batch of transformed images.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(B, 3, H, W)` `f32`.
    pub images: Tensor,
    /// `(B)` `u32`.
    pub labels: Tensor,
    /// The data-set index of each item, in batch order.
    pub indices: Vec<usize>,
    /// Items of this batch that were skipped because the data set failed to produce them.
    pub skipped: usize,
}

/// An item the data set failed to produce, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedItem {
    pub index: usize,
    pub error: String,
}

/// What one epoch delivered, available from [`Epoch::summary`] once the epoch is exhausted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EpochSummary {
    pub epoch: u64,
    /// Batches delivered.
    pub batches: usize,
    /// Items delivered.
    pub items: usize,
    /// Items skipped (corrupt or unreadable).
    pub skipped: usize,
    /// The first [`EpochSummary::KEPT_ERRORS`] skipped items with their error messages.
    pub errors: Vec<SkippedItem>,
}

impl EpochSummary {
    /// How many skipped items keep their message.
    pub const KEPT_ERRORS: usize = 16;
}

impl fmt::Display for EpochSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {}: {} items in {} batches, {} skipped",
            self.epoch,
            thousands(self.items as u64),
            thousands(self.batches as u64),
            thousands(self.skipped as u64)
        )?;
        for e in &self.errors {
            write!(f, "\n  skipped item {}: {}", e.index, e.error)?;
        }
        if self.skipped > self.errors.len() {
            write!(f, "\n  and {} more", self.skipped - self.errors.len())?;
        }
        Ok(())
    }
}

/// Makes epochs of tensor batches from a data set and a transform.
#[derive(Debug)]
pub struct Batcher<D, T> {
    dataset: Arc<D>,
    transform: Arc<T>,
    config: BatchConfig,
    device: Device,
}

impl<D, T> Batcher<D, T>
where
    D: Dataset + 'static,
    T: Transform + 'static,
{
    /// A batcher whose tensors are made on `device`. The batch size must be positive.
    pub fn new(dataset: D, transform: T, config: BatchConfig, device: Device) -> Result<Batcher<D, T>, DataError> {
        if config.batch_size == 0 {
            return Err(DataError::Config("batch size must be positive".to_string()));
        }
        let (h, w) = transform.output_size();
        if h == 0 || w == 0 {
            return Err(DataError::Config(format!("transform output size {h}x{w} is empty")));
        }
        Ok(Batcher { dataset: Arc::new(dataset), transform: Arc::new(transform), config, device })
    }

    /// The data set.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The settings.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// The number of batches in an epoch (before skips).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The data-set indices of every batch of `epoch`, in order; no decoding.
    pub fn plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            DataRng::derive(&[stream::SHUFFLE, self.config.seed, epoch]).shuffle(&mut order);
        }
        let b = self.config.batch_size;
        order.chunks(b).filter(|chunk| !self.config.drop_last || chunk.len() == b).map(<[usize]>::to_vec).collect()
    }

    /// Starts producing the batches of `epoch` on a background thread.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (a resumed run continues mid-epoch):
    /// the same batches, with the same augmentation, as the tail of [`Batcher::epoch`].
    /// The summary then counts only the batches produced.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> Epoch {
        let mut plan = self.plan(epoch);
        plan.drain(..first.min(plan.len()));
        let (tx, rx) = sync_channel(self.config.prefetch);
        let producer = Producer {
            dataset: self.dataset.clone(),
            transform: self.transform.clone(),
            device: self.device.clone(),
            seed: self.config.seed,
            epoch,
        };
        let handle = std::thread::Builder::new()
            .name(format!("nas-data-epoch-{epoch}"))
            .spawn(move || producer.run(plan, tx))
            .expect("spawning the batch producer thread");
        Epoch { rx: Some(rx), handle: Some(handle), summary: None }
    }
}

enum Message {
    Batch(Result<Batch, DataError>),
    Done(EpochSummary),
}

struct Producer<D, T> {
    dataset: Arc<D>,
    transform: Arc<T>,
    device: Device,
    seed: u64,
    epoch: u64,
}

impl<D: Dataset, T: Transform> Producer<D, T> {
    fn run(self, plan: Vec<Vec<usize>>, tx: SyncSender<Message>) {
        let mut summary = EpochSummary { epoch: self.epoch, ..EpochSummary::default() };
        for indices in plan {
            match self.make(indices, &mut summary) {
                Ok(None) => {}
                Ok(Some(batch)) => {
                    summary.batches += 1;
                    summary.items += batch.indices.len();
                    if tx.send(Message::Batch(Ok(batch))).is_err() {
                        return; // the consumer stopped listening
                    }
                }
                Err(e) => {
                    let _ = tx.send(Message::Batch(Err(e)));
                    return;
                }
            }
        }
        let _ = tx.send(Message::Done(summary));
    }

    /// Decodes and transforms one batch in parallel; `None` when every item was skipped.
    fn make(&self, indices: Vec<usize>, summary: &mut EpochSummary) -> Result<Option<Batch>, DataError> {
        let (h, w) = self.transform.output_size();
        let item_len = 3 * h as usize * w as usize;
        let mut data = vec![0f32; indices.len() * item_len];
        let results: Vec<Result<u32, DataError>> = data
            .par_chunks_mut(item_len)
            .zip(indices.par_iter())
            .map(|(out, &index)| {
                let item = self.dataset.get(index)?;
                let mut rng = DataRng::derive(&[stream::AUGMENT, self.seed, self.epoch, index as u64]);
                self.transform.apply(&item.image, &mut rng, out);
                Ok(item.label)
            })
            .collect();
        let mut labels = Vec::with_capacity(indices.len());
        let mut kept = Vec::with_capacity(indices.len());
        let mut skipped = 0;
        for (k, result) in results.into_iter().enumerate() {
            match result {
                Ok(label) => {
                    let to = kept.len();
                    if to != k {
                        data.copy_within(k * item_len..(k + 1) * item_len, to * item_len);
                    }
                    labels.push(label);
                    kept.push(indices[k]);
                }
                Err(e) => {
                    skipped += 1;
                    if summary.errors.len() < EpochSummary::KEPT_ERRORS {
                        summary.errors.push(SkippedItem { index: indices[k], error: e.to_string() });
                    }
                }
            }
        }
        summary.skipped += skipped;
        if kept.is_empty() {
            return Ok(None);
        }
        data.truncate(kept.len() * item_len);
        let n = kept.len();
        let images = Tensor::from_vec(data, (n, 3, h as usize, w as usize), &self.device)?;
        let labels = Tensor::from_vec(labels, n, &self.device)?;
        Ok(Some(Batch { images, labels, indices: kept, skipped }))
    }
}

/// The batches of one epoch, produced on a background thread; an iterator of `Result<Batch>`.
///
/// After the last batch, [`Epoch::summary`] tells how many items were delivered and skipped.
#[derive(Debug)]
pub struct Epoch {
    rx: Option<Receiver<Message>>,
    handle: Option<JoinHandle<()>>,
    summary: Option<EpochSummary>,
}

impl Epoch {
    /// The end-of-epoch summary, once the iterator has returned `None` after a complete epoch.
    pub fn summary(&self) -> Option<&EpochSummary> {
        self.summary.as_ref()
    }

    /// Runs the epoch to its end, discarding the batches, and returns the summary
    /// (or the error that ended the epoch).
    pub fn finish(mut self) -> Result<EpochSummary, DataError> {
        for batch in self.by_ref() {
            batch?;
        }
        Ok(self.summary.take().expect("a complete epoch has a summary"))
    }

    fn join(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(Message::Batch(batch)) => Some(batch),
            Ok(Message::Done(summary)) => {
                self.summary = Some(summary);
                self.rx = None;
                self.join();
                None
            }
            Err(_) => {
                // The producer ended without a summary: it sent an error before, or it panicked.
                self.rx = None;
                self.join();
                None
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Closing the channel first makes a producer blocked on a full channel return.
        self.rx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
