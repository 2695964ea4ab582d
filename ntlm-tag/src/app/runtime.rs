//! The tokio runtime, sized from `workers`.

use anyhow::{Result, bail};

/// The worker threads for `workers` (0: one per CPU this process may run on, so a gateway
/// confined by `taskset`, a cpuset or a CPU quota gets as many workers as it has CPUs).
pub fn resolve_workers(workers: usize) -> usize {
    if workers != 0 {
        return workers;
    }
    // `available_parallelism` honours sched_getaffinity and cgroup CPU quotas on Linux.
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The runtime with `workers` threads (see `resolve_workers` for 0).
pub fn build_runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let workers = resolve_workers(workers);
    // One worker: a current-thread runtime. The multi-thread scheduler with a single worker still
    // pays for cross-thread wake-ups and work-stealing bookkeeping on every request (about twice
    // the CPU per keep-alive request on one core).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().thread_name("ntlm-tag");
    if workers > 1 {
        builder.worker_threads(workers);
    }
    match builder.build() {
        Ok(rt) => Ok(rt),
        Err(e) => bail!("cannot start the runtime: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread confined to CPU 0: what `taskset -c 0`, a one-CPU cpuset or container
    /// gives the whole process (`available_parallelism` reads the calling thread's affinity).
    fn on_one_cpu<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it; pid 0 is
                // the calling thread.
                let status = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_ZERO(&mut set);
                    libc::CPU_SET(0, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
                };
                assert_eq!(status, 0, "sched_setaffinity to CPU 0");
                f()
            })
            .join()
            .expect("the confined thread panicked")
        })
    }

    #[test]
    fn workers_zero_on_one_cpu_is_the_single_threaded_runtime() {
        assert_eq!(resolve_workers(3), 3);
        assert_eq!(on_one_cpu(|| resolve_workers(0)), 1);
        let flavor = on_one_cpu(|| build_runtime(0).expect("runtime").handle().runtime_flavor());
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
    }
}
