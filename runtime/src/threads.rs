//! Intra-op parallelism: tract's matrix products and element-wise kernels
//! split across a pool of compute threads.
//!
//! The agent's `[engine] workers` run requests side by side (throughput);
//! `[engine] threads` gives one request several cores (latency). Each worker
//! gets its own pool of `threads` threads and runs on one of them, so an
//! inference uses at most `threads` cores: its own thread plus the helpers
//! that steal the split parts of its large operations. Small operations
//! stay on the worker's thread (tract only splits work above a size where
//! it pays), so no request waits for a hand-off it does not need.

#[cfg(feature = "threads")]
use std::sync::Arc;

use tract_nnef::internal::{Tensor, TractResult};
use tract_nnef::tract_core::tract_linalg::multithread::{
    Executor, multithread_tract_scope, par_chunks_mut,
};

use crate::error::{Result, RuntimeError};

/// Most compute threads one inference may use.
pub const MAX_THREADS: usize = 64;

/// How tract runs one inference: on the calling thread, or on a private
/// pool of compute threads.
#[derive(Clone, Debug, Default)]
pub struct Threads {
    #[cfg(feature = "threads")]
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Threads {
    /// Everything on the calling thread (the default).
    pub fn single() -> Threads {
        Threads::default()
    }

    /// Whether this build can run an inference on more than one thread
    /// (the `threads` feature); without it [`Threads::new`] gives
    /// [`Threads::single`] for any count.
    pub const AVAILABLE: bool = cfg!(feature = "threads");

    /// A pool of `count` compute threads named `{name}-{i}`; 1 means
    /// [`Threads::single`].
    pub fn new(count: usize, name: &str) -> Result<Threads> {
        if count == 0 || count > MAX_THREADS {
            return Err(RuntimeError::Config {
                detail: format!("threads must be between 1 and {MAX_THREADS}, not {count}"),
            });
        }
        if count == 1 || !Self::AVAILABLE {
            return Ok(Threads::single());
        }
        Self::pool(count, name)
    }

    #[cfg(feature = "threads")]
    fn pool(count: usize, name: &str) -> Result<Threads> {
        let name = name.to_string();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(count)
            .thread_name(move |i| format!("{name}-{i}"))
            .build()
            .map_err(|e| RuntimeError::Config {
                detail: format!("cannot start {count} compute threads: {e}"),
            })?;
        Ok(Threads {
            pool: Some(Arc::new(pool)),
        })
    }

    #[cfg(not(feature = "threads"))]
    fn pool(_count: usize, _name: &str) -> Result<Threads> {
        Ok(Threads::single())
    }

    /// Compute threads one inference may use (1: the calling thread).
    pub fn count(&self) -> usize {
        #[cfg(feature = "threads")]
        if let Some(p) = &self.pool {
            return p.current_num_threads();
        }
        1
    }

    /// Runs `f`, and every tract call it makes, with these threads: on the
    /// calling thread for one, else on a thread of the pool, whose other
    /// threads take the parts tract splits off. A worker runs its whole
    /// loop in it. The single-threaded case still sets tract's executor,
    /// which spares it a global lock per matrix product.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        #[cfg(feature = "threads")]
        if let Some(pool) = &self.pool {
            let executor = Executor::MultiThread(pool.clone());
            return pool.install(|| multithread_tract_scope(executor, f));
        }
        multithread_tract_scope(Executor::SingleThread, f)
    }
}

#[cfg(all(test, feature = "threads"))]
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

    #[test]
    fn work_runs_on_the_pool_when_there_is_one() {
        let on = |t: &Threads| t.run(|| std::thread::current().name().map(str::to_string));
        let here = std::thread::current().name().map(str::to_string);
        assert_eq!(on(&Threads::single()), here);
        let name = on(&Threads::new(2, "runs-on").unwrap()).unwrap();
        assert!(name.starts_with("runs-on-"), "{name}");
    }
}

/// A new f32 tensor of `shape`, zeroed, then filled by `fill(first, rows)`
/// over runs of whole rows of `row_len` values, split across the compute
/// threads when `work` is large enough (tract's `par_chunks_mut`): the
/// runtime's ops write their outputs where tract reads them, as a tensor
/// made from an ndarray would be copied. Nothing runs when the tensor or
/// its rows are empty.
pub(crate) fn par_output(
    shape: &[usize],
    row_len: usize,
    work: usize,
    fill: impl Fn(usize, &mut [f32]) -> TractResult<()> + Sync + Send,
) -> TractResult<Tensor> {
    let mut out = Tensor::zero::<f32>(shape)?;
    if row_len > 0 && out.len() > 0 {
        let mut plain = out.try_as_plain_ram_mut()?;
        par_chunks_mut(plain.as_slice_mut::<f32>()?, row_len, work, fill)?;
    }
    Ok(out)
}
