//! The measured runs: every system under every load workload, one at a time, each proxy alone on
//! its core; `--runs` rounds with the systems interleaved (a slow minute on a shared machine then
//! touches every system, not one), merged into min/median/max. Each proxy is restarted for the
//! NTLM and the idle-memory runs (a fresh heap for the latter).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    Args, Proxy, Workload, idle,
    kernel::{self, ProgStat, XdpCase},
    load::{self, Mode, Plan},
    ntlm::{self, Identity},
    procs::{self, Server},
    results::{self, Measurement, Results},
    servers::{self, Upstream},
    setup::{self, Environment},
    wrk::{self, WrkMode, WrkPlan},
};
use xtask::{root, step, sys::interrupts::TempDir};

/// Stop a run early after this many measured requests (the time bound usually ends it first).
const MAX_REQUESTS: u64 = 20_000_000;
/// NTLM accounts on the acceptors; the client connections take turns.
const NTLM_USERS: usize = 8;

pub fn run_all(args: &Args, env: &Environment) -> Result<Results> {
    servers::check_ports_free()?;
    // Configurations and logs, removed on drop and on Ctrl-C.
    let dir = TempDir::unique("ntlm-tag-bench.")?;
    let users = ntlm::users(NTLM_USERS);
    let backend = servers::start_backend(dir.path())?;
    let acceptors = servers::start_acceptors(dir.path(), &users)?;
    let users = Arc::new(users);
    let mut samples = Vec::new();
    for round in 1..=args.runs.max(1) {
        step(&format!("round {round} of {}", args.runs.max(1)));
        for proxy in Proxy::MAIN.into_iter().filter(|p| p.selected(args)) {
            samples.extend(run_proxy(proxy, args, dir.path(), &users)?);
        }
    }
    let mut runs = results::merge(samples);
    for proxy in Proxy::MAIN
        .into_iter()
        .filter(|p| p.selected(args) && Workload::Idle.selected(args))
    {
        // The L4 relay holds a backend connection per idle client (twice the descriptors, and
        // nothing to compare with an HTTP proxy's pooled upstream).
        if !matches!(proxy, Proxy::Direct | Proxy::HaproxyTcp) {
            let count = idle_connections(args);
            runs.push(with_proxy(proxy, Upstream::Http, dir.path(), args, |s| {
                idle_run(proxy, s, count)
            })?);
        }
    }
    if Proxy::NtlmTagXdp.selected(args) && Workload::KeepAlive.selected(args) {
        runs.push(xdp_on_loopback(args, dir.path(), &users)?);
    }
    let xdp = if args.workload.is_empty() {
        xdp_test_runs(env)
    } else {
        Err("not run (--workload selects workloads)".to_string())
    };
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
    with_proxy(Proxy::NtlmTagXdp, Upstream::Http, dir, args, |s| {
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
    args: &Args,
    f: impl FnOnce(Option<&Server>) -> Result<T>,
) -> Result<T> {
    let server = servers::start_proxy(proxy, upstream, dir, args)
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
    let http: Vec<Workload> = [Workload::KeepAlive, Workload::NewConnection]
        .into_iter()
        .filter(|w| w.selected(args))
        .collect();
    let ntlm = Workload::Ntlm.selected(args);
    if http.is_empty() && !ntlm {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = http
        .iter()
        .chain(ntlm.then_some(&Workload::Ntlm))
        .map(|w| w.label())
        .collect();
    step(&format!("{}: {}", proxy.label(), names.join(", ")));
    let mut out = Vec::new();
    if !http.is_empty() {
        out = with_proxy(proxy, Upstream::Http, dir, args, |s| {
            http.iter()
                .map(|&w| load_run(proxy, w, s, args, users))
                .collect::<Result<Vec<_>>>()
        })?;
    }
    if ntlm {
        out.push(with_proxy(proxy, Upstream::Ntlm, dir, args, |s| {
            load_run(proxy, Workload::Ntlm, s, args, users)
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

/// The keep-alive and new-connection workloads run under wrk; NTLM handshakes under the built-in
/// client (wrk cannot answer a challenge).
fn wrk_plan(proxy: Proxy, workload: Workload, args: &Args) -> Option<WrkPlan> {
    let mode = match workload {
        Workload::KeepAlive => WrkMode::KeepAlive,
        Workload::NewConnection => WrkMode::NewConnection,
        Workload::Ntlm | Workload::Idle => return None,
    };
    Some(WrkPlan {
        target: servers::target(proxy, Upstream::Http),
        mode,
        connections: args.connections,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(args.seconds),
    })
}

fn load_run(
    proxy: Proxy,
    workload: Workload,
    server: Option<&Server>,
    args: &Args,
    users: &Arc<Vec<Identity>>,
) -> Result<Measurement> {
    let probe = || sample(server, proxy);
    let (outcome, percentiles) = match wrk_plan(proxy, workload, args) {
        Some(plan) => {
            let run = wrk::run(&plan, probe)
                .with_context(|| format!("{} under {} (wrk)", proxy.label(), workload.label()))?;
            (run.outcome, Some((run.p50_us, run.p99_us)))
        }
        None => (
            load::run(&plan(proxy, workload, args, users), probe)
                .with_context(|| format!("{} under {}", proxy.label(), workload.label()))?,
            None,
        ),
    };
    let (p50_us, p99_us) =
        percentiles.unwrap_or_else(|| (outcome.percentile_us(50.0), outcome.percentile_us(99.0)));
    let ticks = outcome
        .after
        .cpu_ticks
        .saturating_sub(outcome.before.cpu_ticks);
    let cpu_seconds = ticks as f64 / procs::ticks_per_second();
    let cpu_us_per_request = server
        .filter(|_| outcome.completed > 0)
        .map(|_| cpu_seconds * 1e6 / outcome.completed as f64);
    let proxy_busy = server.map(|_| cpu_seconds / outcome.elapsed.as_secs_f64().max(1e-9));
    let m = Measurement {
        proxy,
        workload,
        completed: outcome.completed,
        seconds: outcome.elapsed.as_secs_f64(),
        per_second: outcome.per_second(),
        p50_us,
        p99_us,
        cpu_us_per_request,
        proxy_busy,
        rate_spread: None,
        cpu_spread: None,
        repeats: 1,
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
        proxy_busy: None,
        rate_spread: None,
        cpu_spread: None,
        repeats: 1,
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
            "    {:<32} {:<28} {:>9.0}/s  p50 {:>7.0} µs  p99 {:>7.0} µs  CPU {:>6} µs/req  busy {:>4}  errors {}{}",
            m.proxy.label(),
            m.workload.label(),
            m.per_second,
            m.p50_us,
            m.p99_us,
            m.cpu_us_per_request
                .map_or("-".into(), |c| format!("{c:.1}")),
            m.proxy_busy
                .map_or("-".into(), |b| format!("{:.0}%", b * 100.0)),
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
    with_proxy(Proxy::NtlmTagEbpf, Upstream::Http, dir, args, |server| {
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
            setup::load_core(),
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
