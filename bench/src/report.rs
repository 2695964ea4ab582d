//! The results as Markdown, CSV and an SVG chart under `bench/results/` (timestamped, and as
//! `latest.*`), with the goals checked against the measurements.

mod goals;
mod tables;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{
    Args, Proxy, Workload, chart,
    results::{Measurement, Results},
    servers,
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
        "\n{}. {}, one worker each; {} \
         runs per cell, systems interleaved. Load average before the run {}, after it {}. Goals, eBPF run-time \
         statistics, XDP per-packet costs and every ratio: \
         [`bench/results/{stamp}.md`](bench/results/{stamp}.md).\n\n\
         ![proxy CPU and throughput per system](bench/results/{stamp}.svg)",
        machine(),
        capitalized(&crate::setup::core_layout()),
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

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("–".into(), |v| num(v, decimals))
}

fn idle_kib(results: &Results, proxy: Proxy) -> Option<f64> {
    results
        .get(proxy, Workload::Idle)
        .and_then(|m| m.idle.as_ref())
        .map(|i| i.kib_per_connection())
}

fn system_label(p: Proxy) -> String {
    if p.is_ntlm_tag() {
        format!("**{}**", p.label())
    } else {
        p.label().to_string()
    }
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
    let ntlm_tag = servers::ntlm_tag_binary(args).display().to_string();
    // A binary given with --ntlm-tag need not be this tree's build.
    let build = match &args.ntlm_tag {
        None => format!(
            "at {commit}{}",
            if dirty { " + uncommitted changes" } else { "" }
        ),
        Some(path) => format!("from `{}`", path.display()),
    };
    let layout = capitalized(&crate::setup::core_layout());
    format!(
        "# ntlm-tag benchmark, {stamp}\n\n\
         - **Machine**: {cores} × {cpu_model}, Linux {kernel}. {layout} (`taskset`), every proxy with **one worker** \
         (nginx `worker_processes 1`, HAProxy `nbthread 1`, ntlm-tag `workers = 1`). Everything on 127.0.0.1.\n\
         - **Load average** (1/5/15 min): before the run {before}; after it {after}. The `load` column is the 1-minute average \
         at the end of each run (the bench itself keeps both cores busy, so about 2 is its own share).\n\
         - **Versions**: {nginx}; {haproxy}; {ntlm_tag_version} {build}.\n\
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

fn markdown(args: &Args, env: &Environment, results: &Results, stamp: &str) -> String {
    let mut out = environment(args, env, results, stamp);
    goals::goals_table(&mut out, results);
    for (workload, unit) in [
        (Workload::KeepAlive, "req"),
        (Workload::NewConnection, "req"),
        (Workload::Ntlm, "handshake"),
    ] {
        tables::load_table(&mut out, results, workload, unit, args.connections);
    }
    tables::idle_table(&mut out, results);
    tables::bpf_table(&mut out, results);
    tables::xdp_table(&mut out, results);
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

/// `text` with its first letter in upper case (a sentence made of a clause).
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map_or(String::new(), |c| c.to_uppercase().chain(chars).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50×");
        assert_eq!(ratio(Some(1.0), None), "–");
        assert_eq!(CSV_HEADER.split(',').count(), 28);
    }
}
