//! Intra-op parallelism: tract's matrix products and element-wise kernels
//! split across a pool of compute threads.
//!
//! The agent's `[engine] workers` run requests side by side (throughput);
//! `[engine] threads` gives one request several cores (latency). Every
//! worker of an engine shares one pool, so `workers = 2, threads = 2` never
//! keeps more than two compute threads busy on tract's behalf besides the
//! workers themselves.

use std::sync::Arc;

use tract_linalg::multithread::{Executor, multithread_tract_scope};

use crate::error::{Result, RuntimeError};

/// Most compute threads one engine may ask for.
pub const MAX_THREADS: usize = 64;

/// How tract runs one inference: on the calling thread, or split across a
/// private pool of compute threads.
#[derive(Clone, Debug)]
pub struct Threads {
    executor: Executor,
    count: usize,
}

impl Default for Threads {
    fn default() -> Self {
        Threads::single()
    }
}

impl Threads {
    /// Everything on the calling thread (the default).
    pub fn single() -> Threads {
        Threads {
            executor: Executor::SingleThread,
            count: 1,
        }
    }

    /// A pool of `count` compute threads named `{name}-{i}`; 1 means
    /// [`Threads::single`].
    pub fn new(count: usize, name: &str) -> Result<Threads> {
        if count == 0 || count > MAX_THREADS {
            return Err(RuntimeError::Config {
                detail: format!("threads must be between 1 and {MAX_THREADS}, not {count}"),
            });
        }
        if count == 1 {
            return Ok(Threads::single());
        }
        let name = name.to_string();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(count)
            .thread_name(move |i| format!("{name}-{i}"))
            .build()
            .map_err(|e| RuntimeError::Config {
                detail: format!("cannot start {count} compute threads: {e}"),
            })?;
        Ok(Threads {
            executor: Executor::MultiThread(Arc::new(pool)),
            count,
        })
    }

    /// Compute threads (1 when inference runs on the calling thread).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Runs `f` with this executor for every tract call it makes on the
    /// current thread. A worker wraps its whole loop in it; also the
    /// single-threaded case, which spares tract a global lock per product.
    pub fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        multithread_tract_scope(self.executor.clone(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_out_of_range_are_refused() {
        for n in [0, MAX_THREADS + 1] {
            let e = Threads::new(n, "t").unwrap_err();
            assert_eq!(e.code(), "runtime_config", "{e}");
            assert!(e.to_string().contains("between 1 and"), "{e}");
        }
        assert_eq!(Threads::new(1, "t").unwrap().count(), 1);
        assert_eq!(Threads::new(3, "t").unwrap().count(), 3);
    }
}
