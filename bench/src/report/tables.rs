//! The tables of the Markdown report: one per load workload, idle memory, the eBPF programs'
//! run-time statistics and the XDP program on crafted frames.

use std::fmt::Write as _;

use super::*;

pub(super) fn load_table(
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

pub(super) fn workload_title(w: Workload) -> &'static str {
    match w {
        Workload::KeepAlive => "1. Keep-alive requests",
        Workload::NewConnection => "2. A new connection for every request",
        Workload::Ntlm => {
            "3. Full NTLMv2 handshakes, end to end (new connection, Type1 → 401 → Type3 → 200)"
        }
        Workload::Idle => "4. Idle keep-alive client connections",
    }
}

pub(super) fn errors(m: &Measurement) -> String {
    match &m.first_error {
        Some(e) if m.errors > 0 => format!("{} ({})", m.errors, e.replace('|', "/")),
        _ => m.errors.to_string(),
    }
}

pub(super) fn idle_table(out: &mut String, results: &Results) {
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

pub(super) fn bpf_table(out: &mut String, results: &Results) {
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

pub(super) fn xdp_table(out: &mut String, results: &Results) {
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
