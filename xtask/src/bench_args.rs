//! The command line of `cargo xtask bench`, which the `ntlm-tag-bench` binary it runs parses too:
//! one definition for the documented command, its `--help` and the bench.

use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Measured seconds per run (each run also has a short warm-up).
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
    /// Measured runs of every system under every load workload (the tables give min, median, max).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Client connections per load run.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Idle keep-alive client connections for the memory run.
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// Before measuring, wait up to this many seconds for the 1-minute load average to drop
    /// below 0.5 (other work on the machine skews every number).
    #[arg(long, default_value_t = 0)]
    pub wait_quiet: u64,
    /// After the measured runs, profile ntlm-tag under the keep-alive load with `perf record`
    /// (software cpu-clock) and write the report next to the results.
    #[arg(long)]
    pub perf: bool,
    /// Only these systems (comma-separated keys: direct, nginx-common, nginx-tuned, haproxy,
    /// haproxy-tcp, ntlm-tag-ebpf, ntlm-tag-no-ebpf, ntlm-tag-ebpf-xdp-lo); default: all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only these workloads (comma-separated keys: keepalive, new-connection, ntlm, idle); default:
    /// all, plus the XDP program on crafted frames, which runs only then.
    #[arg(long, value_delimiter = ',')]
    pub workload: Vec<String>,
    /// The gateway binary to measure (default: the release build of this tree), for comparing two
    /// builds run after run.
    #[arg(long)]
    pub ntlm_tag: Option<PathBuf>,
    /// Where the results go (relative to the workspace root).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}
