//! Inference without gradients, as PyTorch's `torch.no_grad()`.
//!
//! Candle records the graph of every op whose inputs track a gradient, and a network's
//! weights always do: an eval-mode forward kept every activation of the pass alive until its
//! logits were dropped, and ops that cannot record a backward could not take their fast
//! paths. Inside [`no_grad`], this crate's modules may compute results that carry no
//! gradient: a cell's output is detached (the pass keeps one cell's activations at a time),
//! and the cell's concatenation writes its output in one parallel pass. A `backward`
//! through a result of a `no_grad` pass reaches no weight.

use std::cell::Cell;

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` with gradients disabled on this thread (nested calls allowed).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
    }
    DEPTH.with(|d| d.set(d.get() + 1));
    let _restore = Restore;
    f()
}

/// Whether results computed now on this thread must carry gradients: false inside
/// [`no_grad`].
pub fn grad_enabled() -> bool {
    DEPTH.with(|d| d.get() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_and_restores_even_on_panic() {
        assert!(grad_enabled());
        no_grad(|| {
            assert!(!grad_enabled());
            no_grad(|| assert!(!grad_enabled()));
            assert!(!grad_enabled());
        });
        assert!(grad_enabled());
        let caught = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(grad_enabled(), "the guard restores the state when the closure panics");
        // Per thread: another thread is unaffected.
        no_grad(|| assert!(std::thread::spawn(grad_enabled).join().unwrap()));
    }
}
