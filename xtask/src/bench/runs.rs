//! The measured runs: every system under every workload, one at a time, each proxy alone on its
//! core and restarted for the NTLM and the idle-memory runs (a fresh heap for the latter).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    Args, Proxy, Workload,
    idle::{self, IdleResult},
    kernel::{self, ProgStat, XdpCase},
    load::{self, Mode, Plan},
    ntlm::{self, Identity},
    procs::{self, Server},
    servers::{self, Upstream},
    setup::{self, Environment},
};
use crate::{root, step};

/// Stop a run early after this many measured requests (the time bound usually ends it first).
const MAX_REQUESTS: u64 = 20_000_000;
/// NTLM accounts on the acceptors; the client connections take turns.
const NTLM_USERS: usize = 8;

/// One system under one workload.
pub struct Measurement {
    pub proxy: Proxy,
    pub workload: Workload,
    pub completed: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// utime + stime of the proxy's processes over the measured interval ÷ requests.
    pub cpu_us_per_request: Option<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// ntlm-tag's programs over the measured interval.
    pub bpf: Vec<ProgStat>,
    pub idle: Option<IdleResult>,
    /// `/proc/loadavg` at the end of the run.
    pub load_average: String,
}

pub struct Results {
    pub runs: Vec<Measurement>,
    pub xdp: Result<Vec<XdpCase>, String>,
    pub perf_report: Option<PathBuf>,
    pub load_after: String,
    pub elapsed: Duration,
}

impl Results {
    pub fn get(&self, proxy: Proxy, workload: Workload) -> Option<&Measurement> {
        self.runs
            .iter()
            .find(|m| m.proxy == proxy && m.workload == workload)
    }
}

/// A temporary directory for configurations and logs, removed on drop and on Ctrl-C.
struct WorkDir(tempfile::TempDir);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let dir = tempfile::Builder::new()
            .prefix("ntlm-tag-bench.")
            .tempdir()
            .context("cannot create a temporary directory")?;
        procs::register_dir(dir.path());
        Ok(WorkDir(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        procs::unregister_dir(self.0.path());
    }
}

pub fn run_all(args: &Args, env: &Environment) -> Result<Results> {
    servers::check_ports_free()?;
    let dir = WorkDir::new()?;
    let users = ntlm::users(NTLM_USERS);
    let backend = servers::start_backend(dir.path())?;
    let acceptors = servers::start_acceptors(dir.path(), &users)?;
    let users = Arc::new(users);
    let mut runs = Vec::new();
    for proxy in Proxy::MAIN.into_iter().filter(|p| p.selected(args)) {
        runs.extend(run_proxy(proxy, args, dir.path(), &users)?);
    }
    if Proxy::NtlmTagXdp.selected(args) {
        runs.push(xdp_on_loopback(args, dir.path(), &users)?);
    }
    let xdp = xdp_test_runs(env);
    let perf_report = if args.perf {
        Some(profile(args, dir.path(), &users)?)
    } else {
        None
    };
    drop(acceptors);
    drop(backend);
    Ok(Results {
        runs,
        xdp,
        perf_report,
        load_after: setup::load_average(),
        elapsed: env.started.elapsed(),
    })
}

/// ntlm-tag with its XDP program on `lo`: the program's run-time statistics on real packets.
fn xdp_on_loopback(args: &Args, dir: &Path, users: &Arc<Vec<Identity>>) -> Result<Measurement> {
    step(
        "ntlm-tag with its XDP program on lo (generic mode): XDP run-time statistics on real packets",
    );
    with_proxy(Proxy::NtlmTagXdp, Upstream::Http, dir, |s| {
        load_run(Proxy::NtlmTagXdp, Workload::KeepAlive, s, args, users)
    })
}

fn xdp_test_runs(env: &Environment) -> Result<Vec<XdpCase>, String> {
    step("XDP program on crafted frames (BPF_PROG_TEST_RUN)");
    let stats = env
        .bpf_stats
        .as_ref()
        .ok_or("BPF run-time statistics unavailable")?;
    let object = root().join("ntlm-tag-ebpf/target/bpfel-unknown-none/release/ntlm-tag-ebpf");
    kernel::xdp_test_runs(&object, stats).map_err(|e| format!("{e:#}"))
}

/// Starts `proxy` in front of `upstream`, runs `f` against it, stops it.
fn with_proxy<T>(
    proxy: Proxy,
    upstream: Upstream,
    dir: &Path,
    f: impl FnOnce(Option<&Server>) -> Result<T>,
) -> Result<T> {
    let server = servers::start_proxy(proxy, upstream, dir)
        .with_context(|| format!("cannot start {}", proxy.label()))?;
    let result = f(server.as_ref());
    if let (Err(_), Some(s)) = (&result, &server) {
        eprintln!("{} log:\n{}", s.name, s.log_tail());
    }
    result
}

fn run_proxy(
    proxy: Proxy,
    args: &Args,
    dir: &Path,
    users: &Arc<Vec<Identity>>,
) -> Result<Vec<Measurement>> {
    step(&format!(
        "{}: keep-alive, new connections, NTLM, idle memory",
        proxy.label()
    ));
    let mut out = with_proxy(proxy, Upstream::Http, dir, |s| {
        Ok(vec![
            load_run(proxy, Workload::KeepAlive, s, args, users)?,
            load_run(proxy, Workload::NewConnection, s, args, users)?,
        ])
    })?;
    out.push(with_proxy(proxy, Upstream::Ntlm, dir, |s| {
        load_run(proxy, Workload::Ntlm, s, args, users)
    })?);
    if proxy != Proxy::Direct {
        let count = idle_connections(args);
        out.push(with_proxy(proxy, Upstream::Http, dir, |s| {
            idle_run(proxy, s, count)
        })?);
    }
    Ok(out)
}

fn plan(proxy: Proxy, workload: Workload, args: &Args, users: &Arc<Vec<Identity>>) -> Plan {
    let upstream = if workload == Workload::Ntlm {
        Upstream::Ntlm
    } else {
        Upstream::Http
    };
    Plan {
        target: servers::target(proxy, upstream),
        mode: match workload {
            Workload::NewConnection => Mode::NewConnection,
            Workload::Ntlm => Mode::Ntlm(Arc::clone(users)),
            Workload::KeepAlive | Workload::Idle => Mode::KeepAlive,
        },
        connections: args.connections,
        warmup: Duration::from_secs(if workload == Workload::KeepAlive {
            2
        } else {
            1
        }),
        measure: Duration::from_secs(args.seconds),
        max_requests: MAX_REQUESTS,
    }
}

/// What the probe reads at both ends of the measured interval.
struct Sample {
    cpu_ticks: u64,
    bpf: Vec<ProgStat>,
}

fn sample(server: Option<&Server>, proxy: Proxy) -> Sample {
    Sample {
        cpu_ticks: server.map_or(0, Server::cpu_ticks),
        bpf: match server {
            Some(s) if proxy.is_ntlm_tag() => kernel::prog_stats(s.pid()),
            _ => Vec::new(),
        },
    }
}

fn load_run(
    proxy: Proxy,
    workload: Workload,
    server: Option<&Server>,
    args: &Args,
    users: &Arc<Vec<Identity>>,
) -> Result<Measurement> {
    let outcome = load::run(&plan(proxy, workload, args, users), || {
        sample(server, proxy)
    })
    .with_context(|| format!("{} under {}", proxy.label(), workload.label()))?;
    let ticks = outcome
        .after
        .cpu_ticks
        .saturating_sub(outcome.before.cpu_ticks);
    let cpu_us_per_request = server
        .filter(|_| outcome.completed > 0)
        .map(|_| ticks as f64 / procs::ticks_per_second() * 1e6 / outcome.completed as f64);
    let m = Measurement {
        proxy,
        workload,
        completed: outcome.completed,
        seconds: outcome.elapsed.as_secs_f64(),
        per_second: outcome.per_second(),
        p50_us: outcome.percentile_us(50.0),
        p99_us: outcome.percentile_us(99.0),
        cpu_us_per_request,
        errors: outcome.errors,
        bpf: kernel::delta(&outcome.before.bpf, &outcome.after.bpf),
        first_error: outcome.first_error,
        idle: None,
        load_average: setup::load_average(),
    };
    print_line(&m);
    Ok(m)
}

/// File descriptors a proxy needs besides its client connections (listeners, upstream
/// connections, epoll, eBPF maps and programs, logs).
const FD_RESERVE: u64 = 1000;

/// The idle run's size: as asked, unless RLIMIT_NOFILE (one descriptor per connection, in the
/// proxy and in this client alike) does not allow it.
pub fn idle_connections(args: &Args) -> usize {
    let room = setup::nofile().saturating_sub(FD_RESERVE);
    args.idle.min(usize::try_from(room).unwrap_or(usize::MAX))
}

fn idle_run(proxy: Proxy, server: Option<&Server>, count: usize) -> Result<Measurement> {
    let server = server.context("no process to measure")?;
    let started = Instant::now();
    let result = idle::measure(servers::target(proxy, Upstream::Http), count, server)
        .with_context(|| format!("{} with {count} idle connections", proxy.label()))?;
    let m = Measurement {
        proxy,
        workload: Workload::Idle,
        completed: result.connections as u64,
        seconds: started.elapsed().as_secs_f64(),
        per_second: result.connections as f64 / result.seconds_to_open.max(1e-9),
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        cpu_us_per_request: None,
        errors: 0,
        first_error: None,
        bpf: Vec::new(),
        idle: Some(result),
        load_average: setup::load_average(),
    };
    print_line(&m);
    Ok(m)
}

fn print_line(m: &Measurement) {
    match &m.idle {
        Some(idle) => eprintln!(
            "    {:<32} {:<28} {} connections: RSS {} → {} KiB, {:.1} KiB per connection",
            m.proxy.label(),
            m.workload.label(),
            idle.connections,
            idle.rss_before_kib,
            idle.rss_after_kib,
            idle.kib_per_connection()
        ),
        None => eprintln!(
            "    {:<32} {:<28} {:>9.0}/s  p50 {:>7.0} µs  p99 {:>7.0} µs  CPU {:>6} µs/req  errors {}{}",
            m.proxy.label(),
            m.workload.label(),
            m.per_second,
            m.p50_us,
            m.p99_us,
            m.cpu_us_per_request
                .map_or("-".into(), |c| format!("{c:.1}")),
            m.errors,
            m.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ),
    }
}

/// `perf record` (software cpu-clock: this machine may have no hardware counters) of ntlm-tag with
/// eBPF under the keep-alive load; returns the text report.
fn profile(args: &Args, dir: &Path, users: &Arc<Vec<Identity>>) -> Result<PathBuf> {
    step("profiling ntlm-tag (eBPF) under the keep-alive load with perf (cpu-clock)");
    let results = root().join(&args.out);
    std::fs::create_dir_all(&results)?;
    // Kept (under target/, out of git) for `perf report -i` drill-downs.
    let data = root().join("target/bench-perf-ntlm-tag-keepalive.data");
    with_proxy(Proxy::NtlmTagEbpf, Upstream::Http, dir, |server| {
        let pid = server.context("no ntlm-tag process")?.pid().to_string();
        let perf_args: Vec<String> = [
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "2999",
            "-g",
            "--no-buildid",
            "-o",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([data.display().to_string(), "-p".into(), pid])
        .collect();
        let perf = Server::spawn(
            "perf",
            setup::LOAD_CORE,
            Path::new("perf"),
            &perf_args,
            &dir.join("perf.log"),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        load_run(Proxy::NtlmTagEbpf, Workload::KeepAlive, server, args, users)?;
        drop(perf);
        Ok(())
    })?;
    let out = results.join("perf-ntlm-tag-keepalive.txt");
    let mut text = String::new();
    for view in [
        ["--no-children", "-F", "overhead,dso,sym"],
        ["--children", "-F", "overhead_children,overhead,dso,sym"],
    ] {
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--percent-limit",
                "0.7",
                "-g",
                "none",
                "-i",
            ])
            .arg(&data)
            .args(view)
            .output()
            .context("perf report")?;
        text.push_str(&shorten_lines(&String::from_utf8_lossy(&report.stdout)));
    }
    std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}

/// perf's lines without trailing blanks, and long Rust symbols cut at 220 characters.
fn shorten_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let l = l.trim_end();
            let cut: String = l.chars().take(220).collect();
            format!("{cut}\n")
        })
        .collect()
}
