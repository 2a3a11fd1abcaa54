//! What the token state needs from the standard library and tokio: a mutex, atomics, a cell
//! holding the installed token, a channel for a flight's outcome, a clock, timers and a way to
//! start a task.
//!
//! Normal builds use the real thing. The model check (`cargo test --lib` with
//! `RUSTFLAGS="--cfg token_refresh_loom"`, see `state::model`) swaps in loom's checked
//! primitives, so that loom can run the token state's protocol through every interleaving of
//! its threads. Under the model the clock stands still and timers never fire: the model checks
//! the order of events, the paused-clock tests check timing.

#[cfg(not(all(test, token_refresh_loom)))]
pub(crate) use real::*;

#[cfg(all(test, token_refresh_loom))]
pub(crate) use model::*;

#[cfg(not(all(test, token_refresh_loom)))]
mod real {
    use std::future::Future;

    pub(crate) use arc_swap::ArcSwapOption as TokenCell;
    pub(crate) use std::sync::{
        atomic::{AtomicBool, AtomicU8},
        Mutex, MutexGuard,
    };
    pub(crate) use tokio::sync::watch;
    pub(crate) use tokio::time::{sleep, timeout, Instant};

    /// The current time on the runtime's clock (paused in tests that pause it).
    pub(crate) fn now() -> Instant {
        Instant::now()
    }

    /// The runtime that refreshes run on.
    pub(crate) struct Runtime(tokio::runtime::Handle);

    impl Runtime {
        /// The runtime of the calling task, if there is one.
        pub(crate) fn current() -> Option<Self> {
            tokio::runtime::Handle::try_current().ok().map(Self)
        }

        /// Runs `task` on its own, detached.
        pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
            drop(self.0.spawn(task));
        }
    }
}

#[cfg(all(test, token_refresh_loom))]
mod model {
    use std::{
        future::{poll_fn, Future},
        sync::{Arc, OnceLock},
        task::{Poll, Waker},
        time::Duration,
    };

    pub(crate) use loom::sync::{
        atomic::{AtomicBool, AtomicU8},
        Mutex, MutexGuard,
    };
    pub(crate) use tokio::time::Instant;

    /// A clock that stands still, so that every run of the model sees the same times.
    pub(crate) fn now() -> Instant {
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        Instant::from_std(*START.get_or_init(std::time::Instant::now))
    }

    /// The timeout never fires in the model.
    #[derive(Debug)]
    pub(crate) struct Elapsed;

    pub(crate) async fn timeout<F: Future>(_: Duration, future: F) -> Result<F::Output, Elapsed> {
        Ok(future.await)
    }

    pub(crate) async fn sleep(_: Duration) {}

    /// Starts every task on a loom thread of its own.
    pub(crate) struct Runtime;

    impl Runtime {
        pub(crate) fn current() -> Option<Self> {
            Some(Self)
        }

        pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
            drop(loom::thread::spawn(move || loom::future::block_on(task)));
        }
    }

    /// The installed token, behind one of loom's locks (a linearizable stand-in for
    /// `ArcSwapOption`).
    pub(crate) struct TokenCell<T>(Mutex<Option<Arc<T>>>);

    impl<T> TokenCell<T> {
        pub(crate) fn empty() -> Self {
            Self(Mutex::new(None))
        }

        pub(crate) fn load(&self) -> Option<Arc<T>> {
            self.load_full()
        }

        pub(crate) fn load_full(&self) -> Option<Arc<T>> {
            self.0.lock().unwrap().clone()
        }

        pub(crate) fn store(&self, value: Option<Arc<T>>) {
            *self.0.lock().unwrap() = value;
        }
    }

    /// A stand-in for tokio's `watch` with the parts the token state uses.
    pub(crate) mod watch {
        use super::*;

        struct Shared<T> {
            value: T,
            closed: bool,
            receivers: usize,
            wakers: Vec<Waker>,
        }

        impl<T> Shared<T> {
            fn wake_all(&mut self) {
                for waker in self.wakers.drain(..) {
                    waker.wake();
                }
            }
        }

        pub(crate) struct Sender<T>(Arc<Mutex<Shared<T>>>);
        pub(crate) struct Receiver<T>(Arc<Mutex<Shared<T>>>);

        #[derive(Debug)]
        pub(crate) struct RecvError;

        pub(crate) fn channel<T>(value: T) -> (Sender<T>, Receiver<T>) {
            let shared = Arc::new(Mutex::new(Shared {
                value,
                closed: false,
                receivers: 1,
                wakers: Vec::new(),
            }));
            (Sender(Arc::clone(&shared)), Receiver(shared))
        }

        impl<T> Sender<T> {
            pub(crate) fn send_replace(&self, value: T) -> T {
                let mut shared = self.0.lock().unwrap();
                let old = std::mem::replace(&mut shared.value, value);
                shared.wake_all();
                old
            }

            pub(crate) fn receiver_count(&self) -> usize {
                self.0.lock().unwrap().receivers
            }
        }

        impl<T> Drop for Sender<T> {
            fn drop(&mut self) {
                let mut shared = self.0.lock().unwrap();
                shared.closed = true;
                shared.wake_all();
            }
        }

        impl<T: Clone> Receiver<T> {
            /// Like tokio's: the value is checked first, then whether the sender is gone.
            pub(crate) async fn wait_for(
                &mut self,
                mut f: impl FnMut(&T) -> bool,
            ) -> Result<T, RecvError> {
                poll_fn(|cx| {
                    let mut shared = self.0.lock().unwrap();
                    if f(&shared.value) {
                        Poll::Ready(Ok(shared.value.clone()))
                    } else if shared.closed {
                        Poll::Ready(Err(RecvError))
                    } else {
                        shared.wakers.push(cx.waker().clone());
                        Poll::Pending
                    }
                })
                .await
            }
        }

        impl<T> Clone for Receiver<T> {
            fn clone(&self) -> Self {
                self.0.lock().unwrap().receivers += 1;
                Self(Arc::clone(&self.0))
            }
        }

        impl<T> Drop for Receiver<T> {
            fn drop(&mut self) {
                self.0.lock().unwrap().receivers -= 1;
            }
        }
    }
}
