//! `cargo xtask bench`: ntlm-tag side by side with nginx, HAProxy and the backend itself, measured in
//! one run on this machine with the same backend and the same load.
//!
//! Every proxy runs alone on core 0 with one worker; the backend (nginx, or the NTLM acceptor) runs
//! on core 1, and the load generator on core 2 when the machine has one (on two cores it shares
//! core 1 with the backend, and cannot be shown not to be the limit). Workloads: keep-alive
//! requests on 64 connections and a new connection per request (both driven by `wrk`), full NTLM handshakes (this process's own client:
//! wrk cannot speak NTLM), each repeated `--runs` times with the systems interleaved, and 10,000
//! idle keep-alive connections (resident memory per connection). The kernel's own BPF run-time statistics
//! give the cost of ntlm-tag's programs; `BPF_PROG_TEST_RUN` gives the XDP program's cost per packet.
//! Results go to `bench/results/` as Markdown, CSV and an SVG chart.
//!
//! Not part of CI; needs root. The whole run takes about seven minutes after the build. Run it
//! with `sudo cargo xtask bench`, which installs what it drives and builds what it measures first;
//! the command line is `xtask::bench_args::Args`.

mod chart;
mod idle;
mod kernel;
mod load;
mod ntlm;
mod procs;
mod report;
mod results;
mod runs;
mod servers;
mod setup;
mod wrk;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use xtask::{bench_args::Args, step, sys};

#[derive(Parser)]
#[command(
    name = "cargo xtask bench",
    about = "ntlm-tag against nginx, HAProxy and the backend alone"
)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn main() -> ExitCode {
    match run(&Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The systems under test. `Direct` is the backend without a proxy: the limit of this set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Direct,
    NginxCommon,
    NginxTuned,
    Haproxy,
    /// HAProxy relaying TCP (`mode tcp`): no HTTP work at all, the floor an HTTP proxy on the
    /// same loop and the same syscalls can approach.
    HaproxyTcp,
    NtlmTagEbpf,
    NtlmTagNoEbpf,
    /// ntlm-tag with eBPF and its XDP program attached to `lo` (generic mode): only for the XDP
    /// program's run-time statistics on real packets.
    NtlmTagXdp,
}

impl Proxy {
    /// The systems of the main table, in table order.
    pub const MAIN: [Proxy; 7] = [
        Proxy::Direct,
        Proxy::NginxCommon,
        Proxy::NginxTuned,
        Proxy::Haproxy,
        Proxy::HaproxyTcp,
        Proxy::NtlmTagEbpf,
        Proxy::NtlmTagNoEbpf,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Proxy::Direct => "backend direct",
            Proxy::NginxCommon => "nginx common (keepalive 16)",
            Proxy::NginxTuned => "nginx tuned (keepalive 256)",
            Proxy::Haproxy => "HAProxy (http-reuse safe)",
            Proxy::HaproxyTcp => "HAProxy mode tcp (L4 relay floor)",
            Proxy::NtlmTagEbpf => "ntlm-tag eBPF",
            Proxy::NtlmTagNoEbpf => "ntlm-tag no eBPF",
            Proxy::NtlmTagXdp => "ntlm-tag eBPF + XDP on lo (generic)",
        }
    }

    /// A short name for CSV and the chart.
    pub fn key(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::NginxCommon => "nginx-common",
            Proxy::NginxTuned => "nginx-tuned",
            Proxy::Haproxy => "haproxy",
            Proxy::HaproxyTcp => "haproxy-tcp",
            Proxy::NtlmTagEbpf => "ntlm-tag-ebpf",
            Proxy::NtlmTagNoEbpf => "ntlm-tag-no-ebpf",
            Proxy::NtlmTagXdp => "ntlm-tag-ebpf-xdp-lo",
        }
    }

    /// Whether `args` selects this system.
    pub fn selected(self, args: &Args) -> bool {
        args.only.is_empty() || args.only.iter().any(|k| k == self.key())
    }

    pub fn is_ntlm_tag(self) -> bool {
        matches!(
            self,
            Proxy::NtlmTagEbpf | Proxy::NtlmTagNoEbpf | Proxy::NtlmTagXdp
        )
    }
}

/// What the load generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Small requests on long-lived keep-alive connections.
    KeepAlive,
    /// Connect, one request with `Connection: close`, wait for the server's close.
    NewConnection,
    /// Connect, Type1 → 401 + Type2, Type3 → 200, close: one full NTLMv2 login.
    Ntlm,
    /// Open many keep-alive connections, one request each, and hold them idle.
    Idle,
}

impl Workload {
    /// Every workload, in the order a run measures them.
    pub const ALL: [Workload; 4] = [
        Workload::KeepAlive,
        Workload::NewConnection,
        Workload::Ntlm,
        Workload::Idle,
    ];

    /// Whether `args` selects this workload.
    pub fn selected(self, args: &Args) -> bool {
        args.workload.is_empty() || args.workload.iter().any(|k| k == self.key())
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keep-alive requests",
            Workload::NewConnection => "new connection per request",
            Workload::Ntlm => "NTLM handshakes",
            Workload::Idle => "idle keep-alive connections",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keepalive",
            Workload::NewConnection => "new-connection",
            Workload::Ntlm => "ntlm",
            Workload::Idle => "idle",
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if !sys::process::is_root() {
        bail!(
            "the bench pins processes to cores, raises RLIMIT_NOFILE and loads eBPF programs: run it as root"
        );
    }
    if let Some(unknown) = args
        .workload
        .iter()
        .find(|k| !Workload::ALL.iter().any(|w| w.key() == k.as_str()))
    {
        let keys: Vec<&str> = Workload::ALL.iter().map(|w| w.key()).collect();
        bail!(
            "--workload {unknown}: no such workload (known: {})",
            keys.join(", ")
        );
    }
    let env = setup::Environment::enter()?;
    setup::wait_quiet(args.wait_quiet);
    step(&format!("benchmarking ({})", setup::core_layout()));
    let results = runs::run_all(args, &env)?;
    let paths = report::write(args, &env, &results)?;
    step(&format!(
        "results: {} (also latest.md, latest.csv, latest.svg)",
        paths.markdown.display()
    ));
    println!("{}", std::fs::read_to_string(&paths.markdown)?);
    Ok(())
}
