//! What the bench needs before it measures: file-descriptor limits, CPU affinity, BPF statistics,
//! interrupt cleanup and a quiet machine. (`cargo xtask bench` installed the Debian packages and
//! built the release binaries.)

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::{step, sys::interrupts};

/// Open files for this process and everything it starts (20,000 idle connections on both ends).
pub const NOFILE: u64 = 200_000;

/// The core of the proxy under test: nothing else runs on it.
pub const PROXY_CORE: usize = 0;
/// The backend's core (nginx, or the NTLM acceptors).
pub const BACKEND_CORE: usize = 1;

/// The load generator's core: a core of its own when the machine has a third, so that "direct"
/// measures what the generator and the backend can do and a proxy that reaches it is shown to be
/// limited by them; on two cores it shares the backend's, and the report says the generator check
/// cannot pass there.
pub fn load_core() -> usize {
    if cores() >= 3 { 2 } else { BACKEND_CORE }
}

/// How the run's processes are placed, in words, for the step line and the report.
pub fn core_layout() -> String {
    if load_core() == BACKEND_CORE {
        format!(
            "each proxy alone on core {PROXY_CORE}; the backend and the load generator share core {BACKEND_CORE}"
        )
    } else {
        format!(
            "each proxy alone on core {PROXY_CORE}; the backend on core {BACKEND_CORE}; the load generator on core {}",
            load_core()
        )
    }
}

/// The process-wide state of a bench run; restores what it changed when dropped.
pub struct Environment {
    /// The kernel's BPF run-time statistics, on for the whole run when available.
    pub bpf_stats: Option<super::kernel::StatsSwitch>,
    pub bpf_stats_note: String,
    pub started: Instant,
    pub load_before: String,
    /// RLIMIT_NOFILE of every process of the bench (capped by the hard limit without
    /// CAP_SYS_RESOURCE).
    pub nofile: u64,
}

impl Environment {
    pub fn enter() -> Result<Environment> {
        if cores() < 2 {
            bail!("the bench needs two cores: one for the proxy, one for the backend and the load");
        }
        let nofile = raise_nofile(NOFILE)?;
        pin_self(load_core())?;
        interrupts::install("stopping the bench's processes and removing its files")?;
        let (bpf_stats, bpf_stats_note) = match super::kernel::StatsSwitch::on() {
            Ok(switch) => (
                Some(switch),
                "BPF run-time statistics on for the whole run (BPF_ENABLE_STATS: the same switch as \
                 `kernel.bpf_stats_enabled=1`, held by a descriptor, so it ends with the bench however it ends; \
                 the sysctl file itself keeps reading 0)"
                    .to_string(),
            ),
            Err(e) => (None, format!("BPF run-time statistics unavailable: {e:#}")),
        };
        Ok(Environment {
            bpf_stats,
            bpf_stats_note,
            started: Instant::now(),
            load_before: load_average(),
            nofile,
        })
    }
}

/// Raises RLIMIT_NOFILE to `limit`, or as far as the hard limit allows without
/// CAP_SYS_RESOURCE; returns the limit in force.
fn raise_nofile(limit: u64) -> Result<u64> {
    let wanted = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
        let hard = nofile_limits()?.rlim_max;
        let capped = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot raise RLIMIT_NOFILE to its hard limit {hard}"));
        }
    }
    Ok(nofile_limits()?.rlim_cur)
}

fn nofile_limits() -> Result<libc::rlimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(rl)
}

/// The open-file limit this process and its children have.
pub fn nofile() -> u64 {
    nofile_limits().map_or(1024, |rl| rl.rlim_cur)
}

/// Pins this process (every thread it has and starts) to `core`.
fn pin_self(core: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
    let status = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if status != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot pin the load generator to core {core}"));
    }
    Ok(())
}

pub fn sysctl(name: &str) -> String {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `/proc/loadavg`'s three averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn one_minute_load() -> f64 {
    load_average()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX)
}

/// Polls until the 1-minute load average is below 0.5, at most `max_secs`.
pub fn wait_quiet(max_secs: u64) {
    if max_secs == 0 {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    while one_minute_load() >= 0.5 && Instant::now() < deadline {
        step(&format!(
            "waiting for a quiet machine: load average {}",
            load_average()
        ));
        std::thread::sleep(Duration::from_secs(20));
    }
    step(&format!("load average now {}", load_average()));
}

/// Online CPUs (this process itself is pinned to one).
pub fn cores() -> i64 {
    // SAFETY: sysconf has no preconditions.
    i64::from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as i32)
}
