//! The results as Markdown, CSV and an SVG chart under `bench/results/` (timestamped, and as
//! `latest.*`), with the goals checked against the measurements.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{
    Args, Proxy, Workload, chart,
    runs::{Measurement, Results},
    setup::{self, Environment},
};
use xtask::{root, sys::process::first_line};

pub struct Paths {
    pub markdown: PathBuf,
}

pub fn write(args: &Args, env: &Environment, results: &Results) -> Result<Paths> {
    let dir = root().join(&args.out);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stamp = first_line("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    let markdown = markdown(args, env, results, &stamp);
    let csv = csv(results);
    let svg = chart::svg(results, &stamp);
    let md_path = dir.join(format!("{stamp}.md"));
    for (name, text) in [
        (format!("{stamp}.md"), &markdown),
        (format!("{stamp}.csv"), &csv),
        (format!("{stamp}.svg"), &svg),
        ("latest.md".to_string(), &markdown),
        ("latest.csv".to_string(), &csv),
        ("latest.svg".to_string(), &svg),
    ] {
        write_file(&dir.join(name), text)?;
    }
    // The README shows the latest full run (not experiments with --only or another --out).
    if args.only.is_empty() && args.out == Path::new(DEFAULT_OUT) {
        update_readme(&readme_summary(env, results, &stamp))?;
    }
    Ok(Paths { markdown: md_path })
}

const DEFAULT_OUT: &str = "bench/results";
const README_BEGIN: &str = "<!-- bench:begin (written by cargo xtask bench) -->";
const README_END: &str = "<!-- bench:end -->";

/// The headline numbers of a run, one column per system.
fn readme_summary(env: &Environment, results: &Results, stamp: &str) -> String {
    let mut out = String::new();
    let systems = Proxy::MAIN;
    let _ = write!(out, "| {stamp} |");
    for p in systems {
        let _ = write!(out, " {} |", system_label(p));
    }
    let _ = write!(out, "\n|---|");
    for _ in systems {
        let _ = write!(out, "--:|");
    }
    out.push('\n');
    type Cell = fn(&Results, Proxy) -> String;
    let rows: [(&str, Cell); 7] = [
        (
            "keep-alive requests/s, wrk 64 connections: median (min–max)",
            |r, p| rate_cell(r.get(p, Workload::KeepAlive)),
        ),
        ("keep-alive p99 latency, µs (median run)", |r, p| {
            opt(r.get(p, Workload::KeepAlive).map(|m| m.p99_us), 0)
        }),
        ("**proxy CPU per keep-alive request, µs**", |r, p| {
            cpu_cell(r.get(p, Workload::KeepAlive))
        }),
        ("new connections/s, wrk `Connection: close`", |r, p| {
            rate_cell(r.get(p, Workload::NewConnection))
        }),
        ("**proxy CPU per new connection + request, µs**", |r, p| {
            cpu_cell(r.get(p, Workload::NewConnection))
        }),
        (
            "NTLMv2 handshakes/s, end to end (built-in client)",
            |r, p| rate_cell(r.get(p, Workload::Ntlm)),
        ),
        ("resident memory per idle connection, KiB", |r, p| {
            opt(idle_kib(r, p), 1)
        }),
    ];
    for (label, cell) in rows {
        let _ = write!(out, "| {label} |");
        for p in systems {
            let _ = write!(out, " {} |", cell(results, p));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "\n{}. Each proxy alone on core 0 with one worker; the backend and the load generator on core 1; {} \
         runs per cell, systems interleaved. Load average before the run {}, after it {}. Goals, eBPF run-time \
         statistics, XDP per-packet costs and every ratio: \
         [`bench/results/{stamp}.md`](bench/results/{stamp}.md).\n\n\
         ![proxy CPU and throughput per system](bench/results/{stamp}.svg)",
        machine(),
        results.runs.iter().map(|m| m.repeats).max().unwrap_or(0),
        env.load_before.trim(),
        results.load_after.trim()
    );
    out
}

/// `median (min–max)` of a rate, or the one value of a single run.
fn rate_cell(m: Option<&Measurement>) -> String {
    match m.and_then(|m| m.rate_spread) {
        Some(s) if m.is_some_and(|m| m.repeats > 1) => {
            format!("{} ({}–{})", num(s.median, 0), num(s.min, 0), num(s.max, 0))
        }
        _ => opt(m.map(|m| m.per_second), 0),
    }
}

/// `median (min–max)` of the proxy's CPU per request.
fn cpu_cell(m: Option<&Measurement>) -> String {
    match m.and_then(|m| m.cpu_spread) {
        Some(s) if m.is_some_and(|m| m.repeats > 1) => {
            format!("{} ({}–{})", num(s.median, 1), num(s.min, 1), num(s.max, 1))
        }
        _ => opt(m.and_then(|m| m.cpu_us_per_request), 1),
    }
}

/// Replaces the text between the README's bench markers (left alone when they are missing).
fn update_readme(summary: &str) -> Result<()> {
    let path = root().join("README.md");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let (Some(begin), Some(end)) = (text.find(README_BEGIN), text.find(README_END)) else {
        eprintln!("README.md has no bench markers; not updating its table");
        return Ok(());
    };
    if end < begin {
        return Ok(());
    }
    let updated = format!(
        "{}{README_BEGIN}\n{summary}{}",
        &text[..begin],
        &text[end..]
    );
    write_file(&path, &updated)
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// `a ÷ b` as `0.93×`, or `–` when either is missing.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "–".into()
    }
}

fn rate(results: &Results, proxy: Proxy, workload: Workload) -> Option<f64> {
    results.get(proxy, workload).map(|m| m.per_second)
}

fn cpu(results: &Results, proxy: Proxy, workload: Workload) -> Option<f64> {
    results
        .get(proxy, workload)
        .and_then(|m| m.cpu_us_per_request)
}

/// The CPU model as `/proc/cpuinfo` names it.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "?".into())
}

/// `2 × <model>, Linux <release>`.
fn machine() -> String {
    format!(
        "{} × {}, Linux {}",
        setup::cores(),
        cpu_model(),
        setup::sysctl("kernel.osrelease")
    )
}

fn environment(args: &Args, env: &Environment, results: &Results, stamp: &str) -> String {
    let cpu_model = cpu_model();
    let dirty = !first_line(
        "git",
        &["-C", &root().display().to_string(), "status", "--porcelain"],
    )
    .is_empty();
    let commit = first_line(
        "git",
        &[
            "-C",
            &root().display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let ntlm_tag = root().join("target/release/ntlm-tag").display().to_string();
    format!(
        "# ntlm-tag benchmark, {stamp}\n\n\
         - **Machine**: {cores} × {cpu_model}, Linux {kernel}. Every proxy runs alone on **core 0** with **one worker** \
         (nginx `worker_processes 1`, HAProxy `nbthread 1`, ntlm-tag `workers = 1`); the backend and the load generator share \
         **core 1** (`taskset`). Everything on 127.0.0.1.\n\
         - **Load average** (1/5/15 min): before the run {before}; after it {after}. The `load` column is the 1-minute average \
         at the end of each run (the bench itself keeps both cores busy, so about 2 is its own share).\n\
         - **Versions**: {nginx}; {haproxy}; {ntlm_tag_version} at {commit}{dirty}.\n\
         - **Load generators**: keep-alive and new connections: `{wrk}` (`wrk -t1 -c{conns} --latency`, the latter with \
         `-H \"Connection: close\"`), a 1 s warm-up run, then {secs} s measured; NTLM handshakes: built into xtask (Rust, one \
         thread, raw HTTP/1.1; wrk cannot answer a challenge), {conns} connections, 1 s warm-up, {secs} s measured. {runs} runs \
         of every system and workload, the systems interleaved. Proxy CPU = utime + stime of the proxy's processes (/proc) \
         over the measured interval ÷ requests in it. HAProxy `mode tcp` relays the same traffic with no HTTP work: the \
         floor (kernel TCP work and one event loop) an HTTP proxy can approach.\n\
         - **Backend**: nginx (`return 200 \"ok\\n\"`, one worker); NTLM: the NTLMv2 test acceptor (`ntlm-acceptor`, keyed by \
         `Jespa-Connection-Id` behind proxies, by TCP connection when direct), 8 accounts.\n\
         - **Access logs off** everywhere (ntlm-tag `access_log = false`, nginx `access_log off`, HAProxy without `log`). \
         nginx client side `keepalive_requests 100000000` (HAProxy and ntlm-tag have no per-connection request cap); \
         HAProxy and nginx set `Jespa-Connection-Id` to `ip:port` like the common recipe.\n\
         - {bpf_note}. RLIMIT_NOFILE {nofile}{nofile_note}. Total bench time {minutes:.1} min.\n",
        cores = setup::cores(),
        kernel = setup::sysctl("kernel.osrelease"),
        before = env.load_before,
        after = results.load_after,
        nginx = first_line("nginx", &["-v"]),
        haproxy = first_line("haproxy", &["-v"]),
        ntlm_tag_version = first_line(&ntlm_tag, &["--version"]),
        dirty = if dirty { " + uncommitted changes" } else { "" },
        conns = args.connections,
        secs = args.seconds,
        runs = args.runs,
        wrk = first_line("wrk", &["-v"]),
        bpf_note = env.bpf_stats_note,
        nofile = env.nofile,
        nofile_note = nofile_note(args),
        minutes = results.elapsed.as_secs_f64() / 60.0,
    )
}

fn nofile_note(args: &Args) -> String {
    let count = super::runs::idle_connections(args);
    if count < args.idle {
        format!(
            " (the hard limit; raising it needs CAP_SYS_RESOURCE, which this machine does not give): \
             the idle run holds {count} connections instead of {}",
            args.idle
        )
    } else {
        String::new()
    }
}

fn load_table(
    out: &mut String,
    results: &Results,
    workload: Workload,
    unit: &str,
    connections: usize,
) {
    let _ = writeln!(
        out,
        "\n## {} ({} connections)\n\n\
         {unit}/s and proxy CPU: median (min–max) over the runs; latencies from the median run; proxy core busy = \
         its CPU time ÷ the interval (near 100%: the proxy was the limit).\n\n\
         | system | {unit}/s | p50 µs | p99 µs | proxy CPU µs/{unit} | proxy core busy | {unit}/s ÷ direct | ÷ nginx common | ÷ nginx tuned | ÷ HAProxy | CPU ÷ nginx common | ÷ nginx tuned | ÷ HAProxy | ÷ L4 floor | errors | load |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        workload_title(workload),
        connections,
    );
    for m in results
        .runs
        .iter()
        .filter(|m| m.workload == workload && m.proxy != Proxy::NtlmTagXdp)
    {
        let r = |p| rate(results, p, workload);
        let c = |p| cpu(results, p, workload);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            system_label(m.proxy),
            rate_cell(Some(m)),
            num(m.p50_us, 0),
            num(m.p99_us, 0),
            cpu_cell(Some(m)),
            m.proxy_busy
                .map_or("–".into(), |b| format!("{:.0}%", b * 100.0)),
            ratio(Some(m.per_second), r(Proxy::Direct)),
            ratio(Some(m.per_second), r(Proxy::NginxCommon)),
            ratio(Some(m.per_second), r(Proxy::NginxTuned)),
            ratio(Some(m.per_second), r(Proxy::Haproxy)),
            ratio(m.cpu_us_per_request, c(Proxy::NginxCommon)),
            ratio(m.cpu_us_per_request, c(Proxy::NginxTuned)),
            ratio(m.cpu_us_per_request, c(Proxy::Haproxy)),
            ratio(m.cpu_us_per_request, c(Proxy::HaproxyTcp)),
            errors(m),
            m.load_average.split_whitespace().next().unwrap_or("?"),
        );
    }
}

fn workload_title(w: Workload) -> &'static str {
    match w {
        Workload::KeepAlive => "1. Keep-alive requests",
        Workload::NewConnection => "2. A new connection for every request",
        Workload::Ntlm => {
            "3. Full NTLMv2 handshakes, end to end (new connection, Type1 → 401 → Type3 → 200)"
        }
        Workload::Idle => "4. Idle keep-alive client connections",
    }
}

fn system_label(p: Proxy) -> String {
    if p.is_ntlm_tag() {
        format!("**{}**", p.label())
    } else {
        p.label().to_string()
    }
}

fn errors(m: &Measurement) -> String {
    match &m.first_error {
        Some(e) if m.errors > 0 => format!("{} ({})", m.errors, e.replace('|', "/")),
        _ => m.errors.to_string(),
    }
}

fn idle_table(out: &mut String, results: &Results) {
    let per = |p| {
        results
            .get(p, Workload::Idle)
            .and_then(|m| m.idle.as_ref())
            .map(|i| i.kib_per_connection())
    };
    let _ = writeln!(
        out,
        "\n## {}\n\n\
         Each connection made one request and stays open; resident memory (VmRSS of all the proxy's processes) before and \
         2 s after the last one opened, on a freshly started proxy. Kernel socket memory is not included.\n\n\
         | system | connections | opened in s | RSS before MiB | RSS after MiB | KiB per connection | ÷ nginx common | ÷ nginx tuned | ÷ HAProxy |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|",
        workload_title(Workload::Idle)
    );
    for m in results.runs.iter().filter(|m| m.workload == Workload::Idle) {
        let Some(i) = &m.idle else { continue };
        let k = Some(i.kib_per_connection());
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            system_label(m.proxy),
            i.connections,
            i.seconds_to_open,
            i.rss_before_kib as f64 / 1024.0,
            i.rss_after_kib as f64 / 1024.0,
            i.kib_per_connection(),
            ratio(k, per(Proxy::NginxCommon)),
            ratio(k, per(Proxy::NginxTuned)),
            ratio(k, per(Proxy::Haproxy)),
        );
    }
}

fn bpf_table(out: &mut String, results: &Results) {
    let _ = writeln!(
        out,
        "\n## eBPF programs: the kernel's run-time statistics (run_time_ns / run_cnt)\n\n\
         Per program of the ntlm-tag process over each measured interval. On loopback much of this runs in the softirq of \
         the *sending* core (the client's final ACK is processed on core 1), so it is not all in the proxy CPU column.\n\n\
         | run | program | runs | runs per request | ns per run | ns per request |\n|---|---|--:|--:|--:|--:|"
    );
    for m in results.runs.iter().filter(|m| !m.bpf.is_empty()) {
        for p in &m.bpf {
            let per_req = p.run_cnt as f64 / m.completed.max(1) as f64;
            let _ = writeln!(
                out,
                "| {} · {} | {} (id {}) | {} | {:.2} | {:.0} | {:.0} |",
                m.proxy.label(),
                m.workload.label(),
                p.kind,
                p.id,
                p.run_cnt,
                per_req,
                p.ns_per_run(),
                p.run_time_ns as f64 / m.completed.max(1) as f64,
            );
        }
    }
    if let Some(x) = results.get(Proxy::NtlmTagXdp, Workload::KeepAlive) {
        let _ = writeln!(
            out,
            "\nThe XDP row comes from an extra keep-alive run with `xdp = [\"lo\"]` (generic XDP on loopback sees every \
             packet of the client, the proxy and the backend): {:.0} req/s, proxy CPU {} µs/req. Generic XDP copies cloned \
             loopback skbs, so that run's throughput says little about native XDP on a NIC; the per-run cost does.",
            x.per_second,
            x.cpu_us_per_request.map_or("–".into(), |c| num(c, 1)),
        );
    }
}

fn xdp_table(out: &mut String, results: &Results) {
    let _ = writeln!(
        out,
        "\n## XDP program `decap_ipip` on crafted frames (BPF_PROG_TEST_RUN)\n"
    );
    let cases = match &results.xdp {
        Ok(cases) => cases,
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}");
            return;
        }
    };
    let _ = writeln!(
        out,
        "| frame | method | ns per packet | test-run ns (raw) | ns per run, kernel stats |\n|---|---|--:|--:|--:|"
    );
    for c in cases {
        let _ = writeln!(
            out,
            "| {} | {} | **{}** | {} | {} |",
            c.name,
            c.method,
            num(c.net_ns, 1),
            num(c.test_run_ns, 1),
            num(c.stats_ns, 1)
        );
    }
    let _ = writeln!(
        out,
        "\nA decapsulated frame cannot be repeated inside one test run (the kernel reruns the program on the \
         already-changed buffer), so those frames run singly and the harness's own cost per single run (the plain \
         frame run singly minus repeated) is taken off. Test runs are timed with the run-time statistics paused; \
         the statistics column (a separate pass) includes their two clock reads per run."
    );
}

/// A performance goal and how this run did.
struct Goal {
    goal: &'static str,
    measured: String,
    status: &'static str,
}

/// `value` against `limit` where lower is better, with 2% for noise.
fn at_most(value: Option<f64>, limit: Option<f64>) -> &'static str {
    match (value, limit) {
        (Some(v), Some(l)) if v <= l => "met",
        (Some(v), Some(l)) if v <= l * 1.02 => "within noise (≤ 2%)",
        (Some(_), Some(_)) => "**missed**",
        _ => "not measured",
    }
}

fn at_least(value: Option<f64>, limit: Option<f64>) -> &'static str {
    at_most(limit, value)
}

/// The fastest proxy's median rate under `workload` (not `Direct`, nor the XDP variant).
fn fastest_proxy(results: &Results, workload: Workload) -> Option<(Proxy, f64)> {
    Proxy::MAIN
        .into_iter()
        .filter(|p| *p != Proxy::Direct)
        .filter_map(|p| rate(results, p, workload).map(|r| (p, r)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// The lower of two optional values (whichever is there).
fn lower(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn idle_kib(results: &Results, proxy: Proxy) -> Option<f64> {
    results
        .get(proxy, Workload::Idle)
        .and_then(|m| m.idle.as_ref())
        .map(|i| i.kib_per_connection())
}

fn goals(results: &Results) -> Vec<Goal> {
    use Proxy::*;
    use Workload::*;
    let tag = NtlmTagEbpf;
    let ka_cpu = cpu(results, tag, KeepAlive);
    let best_ka_cpu = lower(
        cpu(results, NginxTuned, KeepAlive),
        cpu(results, Haproxy, KeepAlive),
    );
    let floor = cpu(results, HaproxyTcp, KeepAlive);
    let best_ntlm = [NginxCommon, NginxTuned, Haproxy, HaproxyTcp]
        .into_iter()
        .filter_map(|p| rate(results, p, Ntlm).map(|r| (p, r)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let (sock_ops_pct, sock_ops_text) = sock_ops_share(results);
    let xdp_worst = results
        .xdp
        .as_ref()
        .ok()
        .and_then(|c| c.iter().map(|c| c.net_ns).reduce(f64::max));
    let idle = idle_kib(results, tag);
    let mut goals = vec![
        Goal {
            goal: "keep-alive proxy CPU per request ≤ the best of nginx tuned and HAProxy",
            measured: format!(
                "{} µs (nginx tuned {}, HAProxy {}, nginx common {}; no eBPF {})",
                opt(ka_cpu, 1),
                opt(cpu(results, NginxTuned, KeepAlive), 1),
                opt(cpu(results, Haproxy, KeepAlive), 1),
                opt(cpu(results, NginxCommon, KeepAlive), 1),
                opt(cpu(results, NtlmTagNoEbpf, KeepAlive), 1),
            ),
            status: at_most(ka_cpu, best_ka_cpu),
        },
        Goal {
            goal: "keep-alive proxy CPU per request ≤ 1.25× the L4-relay floor (HAProxy mode tcp)",
            measured: format!(
                "{} µs = {} the floor's {} µs",
                opt(ka_cpu, 1),
                ratio(ka_cpu, floor),
                opt(floor, 1)
            ),
            status: at_most(ka_cpu, floor.map(|f| f * 1.25)),
        },
        Goal {
            goal: "keep-alive requests/s ≥ HAProxy's",
            measured: format!(
                "{} req/s; HAProxy {}",
                opt(rate(results, tag, KeepAlive), 0),
                opt(rate(results, Haproxy, KeepAlive), 0),
            ),
            status: at_least(
                rate(results, tag, KeepAlive),
                rate(results, Haproxy, KeepAlive),
            ),
        },
        Goal {
            goal: "proxy CPU per new connection ≤ nginx tuned's",
            measured: format!(
                "{} µs; nginx tuned {}, HAProxy {}, nginx common {}",
                opt(cpu(results, tag, NewConnection), 1),
                opt(cpu(results, NginxTuned, NewConnection), 1),
                opt(cpu(results, Haproxy, NewConnection), 1),
                opt(cpu(results, NginxCommon, NewConnection), 1),
            ),
            status: at_most(
                cpu(results, tag, NewConnection),
                cpu(results, NginxTuned, NewConnection),
            ),
        },
        Goal {
            goal: "NTLM handshakes/s at least the best peer's",
            measured: format!(
                "{} handshakes/s; best peer {} {}",
                opt(rate(results, tag, Ntlm), 0),
                best_ntlm.map_or("–", |b| b.0.label()),
                opt(best_ntlm.map(|b| b.1), 0)
            ),
            status: at_least(rate(results, tag, Ntlm), best_ntlm.map(|b| b.1)),
        },
        Goal {
            goal: "eBPF ≤ 3% of ntlm-tag's CPU per new connection",
            measured: sock_ops_text,
            status: at_most(sock_ops_pct, Some(3.0)),
        },
        Goal {
            goal: "XDP ≤ 150 ns per packet",
            measured: format!(
                "worst frame {} ns per packet (BPF_PROG_TEST_RUN, harness cost removed)",
                opt(xdp_worst, 1)
            ),
            status: at_most(xdp_worst, Some(150.0)),
        },
        Goal {
            goal: "≤ 4 KiB resident memory per idle client connection",
            measured: format!(
                "{} KiB (nginx tuned {}, HAProxy {})",
                opt(idle, 1),
                opt(idle_kib(results, NginxTuned), 1),
                opt(idle_kib(results, Haproxy), 1),
            ),
            status: at_most(idle, Some(4.0)),
        },
    ];
    for (goal, w) in [
        (
            "load generator not the limit, keep-alive: direct ≥ 1.5× the fastest proxy",
            KeepAlive,
        ),
        (
            "load generator not the limit, new connections: direct ≥ 1.5× the fastest proxy",
            NewConnection,
        ),
    ] {
        let fastest = fastest_proxy(results, w);
        let direct = rate(results, Direct, w);
        goals.push(Goal {
            goal,
            measured: format!(
                "direct {} = {} {} ({}, its core {} busy)",
                opt(direct, 0),
                ratio(direct, fastest.map(|f| f.1)),
                fastest.map_or("–", |f| f.0.label()),
                opt(fastest.map(|f| f.1), 0),
                fastest
                    .and_then(|f| results.get(f.0, w))
                    .and_then(|m| m.proxy_busy)
                    .map_or("–".into(), |b| format!("{:.0}%", b * 100.0)),
            ),
            status: at_least(direct, fastest.map(|f| f.1 * 1.5)),
        });
    }
    goals
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("–".into(), |v| num(v, decimals))
}

/// sock_ops run time per new connection (kernel statistics, free of run-to-run noise) as a share
/// of ntlm-tag's own CPU per connection with eBPF.
fn sock_ops_share(results: &Results) -> (Option<f64>, String) {
    let Some(m) = results.get(Proxy::NtlmTagEbpf, Workload::NewConnection) else {
        return (None, "–".into());
    };
    let ns: u64 = m
        .bpf
        .iter()
        .filter(|p| p.kind == "sock_ops")
        .map(|p| p.run_time_ns)
        .sum();
    let per_conn_us = ns as f64 / m.completed.max(1) as f64 / 1000.0;
    match m.cpu_us_per_request {
        Some(total) if total > 0.0 => {
            let pct = per_conn_us / total * 100.0;
            (
                Some(pct),
                format!(
                    "sock_ops {per_conn_us:.2} µs per connection = {pct:.1}% of ntlm-tag's {total:.1} µs \
                     (median run; without eBPF {} µs)",
                    opt(
                        cpu(results, Proxy::NtlmTagNoEbpf, Workload::NewConnection),
                        1
                    )
                ),
            )
        }
        _ => (None, format!("sock_ops {per_conn_us:.2} µs per connection")),
    }
}

fn goals_table(out: &mut String, results: &Results) {
    let _ = writeln!(
        out,
        "\n## Goals\n\n| goal | measured (ntlm-tag) | status |\n|---|---|---|"
    );
    for g in goals(results) {
        let _ = writeln!(out, "| {} | {} | {} |", g.goal, g.measured, g.status);
    }
}

fn markdown(args: &Args, env: &Environment, results: &Results, stamp: &str) -> String {
    let mut out = environment(args, env, results, stamp);
    goals_table(&mut out, results);
    for (workload, unit) in [
        (Workload::KeepAlive, "req"),
        (Workload::NewConnection, "req"),
        (Workload::Ntlm, "handshake"),
    ] {
        load_table(&mut out, results, workload, unit, args.connections);
    }
    idle_table(&mut out, results);
    bpf_table(&mut out, results);
    xdp_table(&mut out, results);
    if let Some(p) = &results.perf_report {
        let _ = writeln!(
            out,
            "\nperf profile of ntlm-tag (keep-alive, separate run): `{}` (data: \
             `target/bench-perf-ntlm-tag-keepalive.data`)",
            p.display()
        );
    }
    let _ = writeln!(out, "\nChart: `{stamp}.svg` (also `latest.svg`).");
    out
}

const CSV_HEADER: &str = "workload,system,requests,seconds,per_second,p50_us,p99_us,proxy_cpu_us_per_request,errors,\
per_second_vs_direct,per_second_vs_nginx_common,per_second_vs_nginx_tuned,per_second_vs_haproxy,\
cpu_vs_nginx_common,cpu_vs_nginx_tuned,cpu_vs_haproxy,rss_before_kib,rss_after_kib,kib_per_connection,\
bpf_ns_per_request,xdp_ns_per_packet,load_average_1m,runs,per_second_min,per_second_max,\
proxy_cpu_us_min,proxy_cpu_us_max,proxy_core_busy";

fn csv(results: &Results) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    for m in &results.runs {
        let _ = writeln!(out, "{}", csv_row(results, m));
    }
    if let Ok(cases) = &results.xdp {
        for c in cases {
            let mut row = vec![String::new(); CSV_HEADER.split(',').count()];
            row[0] = "xdp-test-run".into();
            row[1] = format!("\"{} ({})\"", c.name, c.method);
            row[20] = num(c.net_ns, 1);
            let _ = writeln!(out, "{}", row.join(","));
        }
    }
    out
}

fn csv_row(results: &Results, m: &Measurement) -> String {
    let plain = |r: String| r.trim_end_matches('×').replace('–', "");
    let r = |p| plain(ratio(Some(m.per_second), rate(results, p, m.workload)));
    let c = |p| plain(ratio(m.cpu_us_per_request, cpu(results, p, m.workload)));
    let idle = m.idle.as_ref();
    let bpf_ns: u64 = m.bpf.iter().map(|p| p.run_time_ns).sum();
    [
        m.workload.key().to_string(),
        m.proxy.key().to_string(),
        m.completed.to_string(),
        num(m.seconds, 3),
        num(m.per_second, 1),
        num(m.p50_us, 1).replace('–', ""),
        num(m.p99_us, 1).replace('–', ""),
        m.cpu_us_per_request.map_or(String::new(), |c| num(c, 2)),
        m.errors.to_string(),
        r(Proxy::Direct),
        r(Proxy::NginxCommon),
        r(Proxy::NginxTuned),
        r(Proxy::Haproxy),
        c(Proxy::NginxCommon),
        c(Proxy::NginxTuned),
        c(Proxy::Haproxy),
        idle.map_or(String::new(), |i| i.rss_before_kib.to_string()),
        idle.map_or(String::new(), |i| i.rss_after_kib.to_string()),
        idle.map_or(String::new(), |i| num(i.kib_per_connection(), 2)),
        if m.bpf.is_empty() {
            String::new()
        } else {
            num(bpf_ns as f64 / m.completed.max(1) as f64, 1)
        },
        String::new(),
        m.load_average
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string(),
        m.repeats.to_string(),
        m.rate_spread.map_or(String::new(), |s| num(s.min, 1)),
        m.rate_spread.map_or(String::new(), |s| num(s.max, 1)),
        m.cpu_spread.map_or(String::new(), |s| num(s.min, 2)),
        m.cpu_spread.map_or(String::new(), |s| num(s.max, 2)),
        m.proxy_busy.map_or(String::new(), |b| num(b, 3)),
    ]
    .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_statuses() {
        assert_eq!(at_most(Some(9.0), Some(10.0)), "met");
        assert_eq!(at_most(Some(10.1), Some(10.0)), "within noise (≤ 2%)");
        assert_eq!(at_most(Some(12.0), Some(10.0)), "**missed**");
        assert_eq!(at_least(Some(99.0), Some(100.0)), "within noise (≤ 2%)");
        assert_eq!(at_least(Some(101.0), Some(100.0)), "met");
        assert_eq!(at_most(None, Some(1.0)), "not measured");
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50×");
        assert_eq!(ratio(Some(1.0), None), "–");
        assert_eq!(CSV_HEADER.split(',').count(), 28);
    }
}
