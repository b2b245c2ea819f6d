//! Inference without gradients, as PyTorch's `torch.no_grad()`.
//!
//! Candle records the graph of every op whose inputs track a gradient, and a network's
//! weights always do: an eval-mode forward kept every activation of the pass alive until its
//! logits were dropped, and ops that cannot record a backward could not take their fast
//! paths. Inside [`no_grad`], this crate's modules may compute results that carry no
//! gradient: a cell's output is detached (the pass keeps one cell's activations at a time),
//! and the cell's concatenation writes its output in one parallel pass. A `backward`
//! through a result of a `no_grad` pass reaches no weight.
//!
//! The mode is per thread, and a rayon worker that waits inside a parallel op runs other
//! pending jobs meanwhile (work stealing), including another caller's whole step: that job
//! would see the worker's mode, not its own caller's. Code that hands a computation to a pool
//! runs it under [`with_grad_enabled`] with the mode of the thread that asked for it
//! (`nas_train::on_pool` does).

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

/// Runs `f` with gradients enabled or disabled on this thread as `enabled` says, whatever the
/// thread's mode before, and restores that mode afterwards (also when `f` panics).
pub fn with_grad_enabled<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEPTH.with(|d| d.replace(usize::from(!enabled))));
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

    #[test]
    fn with_grad_enabled_sets_the_mode_either_way_and_restores_it() {
        no_grad(|| {
            no_grad(|| {
                assert!(with_grad_enabled(true, grad_enabled));
                assert!(!with_grad_enabled(false, grad_enabled));
                // Inside, no_grad nests as usual.
                with_grad_enabled(true, || no_grad(|| assert!(!grad_enabled())));
                assert!(!grad_enabled());
            });
            assert!(!grad_enabled(), "the outer no_grad still holds");
        });
        assert!(grad_enabled());
        assert!(!with_grad_enabled(false, grad_enabled));
        let caught = std::panic::catch_unwind(|| with_grad_enabled(false, || panic!("inside")));
        assert!(caught.is_err());
        assert!(grad_enabled(), "restored when the closure panics");
    }
}
