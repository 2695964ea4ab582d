//! The keep-alive and new-connection workloads, driven by `wrk` (the standard HTTP load generator:
//! C, epoll, far cheaper per request than the built-in Rust client) on the load core, one thread.
//! A short warm-up run, then the measured run; `probe` is sampled right before and right after
//! the measured one, so the proxy's CPU time matches wrk's request count (give or take wrk's
//! connect at the start).

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{load::Outcome, setup::load_core};

/// How wrk's connections behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrkMode {
    KeepAlive,
    /// `Connection: close` on every request: wrk reconnects after each response.
    NewConnection,
}

pub struct WrkPlan {
    pub target: SocketAddr,
    pub mode: WrkMode,
    pub connections: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

/// One measured wrk run (the latencies as wrk's own percentiles, not a sorted list).
pub struct WrkOutcome<T> {
    pub outcome: Outcome<T>,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub fn run<T>(plan: &WrkPlan, probe: impl Fn() -> T) -> Result<WrkOutcome<T>> {
    if !plan.warmup.is_zero() {
        wrk(plan, plan.warmup).context("wrk warm-up")?;
    }
    let before = probe();
    let started = Instant::now();
    let report = wrk(plan, plan.measure)?;
    let elapsed = started.elapsed();
    let after = probe();
    Ok(WrkOutcome {
        outcome: Outcome {
            completed: report.requests,
            errors: report.errors,
            first_error: report.error_text,
            elapsed: Duration::from_secs_f64(report.seconds.max(1e-3)).min(elapsed),
            latencies: Vec::new(),
            before,
            after,
        },
        p50_us: report.p50_us,
        p99_us: report.p99_us,
    })
}

fn wrk(plan: &WrkPlan, duration: Duration) -> Result<WrkReport> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &load_core().to_string(), "wrk", "-t1", "--latency"])
        .arg(format!("-c{}", plan.connections))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s");
    if plan.mode == WrkMode::NewConnection {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{}/", plan.target));
    let out = cmd
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
}

/// What the bench takes from wrk's text report.
#[derive(Debug, PartialEq)]
struct WrkReport {
    requests: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    /// Socket errors plus non-2xx/3xx responses.
    errors: u64,
    error_text: Option<String>,
}

fn parse(text: &str) -> Result<WrkReport> {
    let mut requests = None;
    let mut seconds = None;
    let (mut p50_us, mut p99_us) = (f64::NAN, f64::NAN);
    let mut errors = 0;
    let mut error_lines = Vec::new();
    for line in text.lines().map(str::trim) {
        // "123456 requests in 4.00s, 12.34MB read"
        if let Some((count, rest)) = line.split_once(" requests in ") {
            requests = count.trim().parse::<u64>().ok();
            seconds = rest
                .split(',')
                .next()
                .and_then(|d| duration_us(d.trim()))
                .map(|us| us / 1e6);
        } else if let Some(value) = line.strip_prefix("50%") {
            p50_us = duration_us(value.trim()).unwrap_or(f64::NAN);
        } else if let Some(value) = line.strip_prefix("99%") {
            p99_us = duration_us(value.trim()).unwrap_or(f64::NAN);
        } else if let Some(counts) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            let n: u64 = counts
                .split(',')
                .filter_map(|c| c.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            if n > 0 {
                errors += n;
                error_lines.push(line.to_string());
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>().unwrap_or(0);
            error_lines.push(line.to_string());
        }
    }
    let (Some(requests), Some(seconds)) = (requests, seconds) else {
        bail!("no \"N requests in Ts\" line");
    };
    Ok(WrkReport {
        requests,
        seconds,
        p50_us,
        p99_us,
        errors,
        error_text: (!error_lines.is_empty()).then(|| error_lines.join("; ")),
    })
}

/// wrk's durations (`812.00us`, `1.23ms`, `4.00s`, `1.00m`) in microseconds.
fn duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 4s test @ http://127.0.0.1:28090/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms  120.00us   5.00ms   90.00%
    Req/Sec    61.00k     2.00k   64.00k    80.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.30ms
     99%    2.50ms
  244000 requests in 4.00s, 30.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  61000.00
Transfer/sec:      7.50MB
";

    #[test]
    fn reads_wrk_report() {
        let r = parse(SAMPLE).expect("a full report");
        assert_eq!(r.requests, 244_000);
        assert!((r.seconds - 4.0).abs() < 1e-9);
        assert!((r.p50_us - 812.0).abs() < 1e-9);
        assert!((r.p99_us - 2500.0).abs() < 1e-9);
        assert_eq!(r.errors, 6);
        assert!(r.error_text.expect("errors").contains("read 3"));
    }

    #[test]
    fn clean_run_has_no_errors() {
        let clean: String = SAMPLE
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        let r = parse(&clean).expect("a report without errors");
        assert_eq!((r.errors, r.error_text), (0, None));
        assert!(parse("garbage").is_err());
    }
}
