//! The load generator: many HTTP/1.1 client connections on one thread (a current-thread tokio
//! runtime on the load core), bounded in time and in count, with a warm-up. `probe` is sampled at
//! the start and the end of the measured interval, so the proxy's CPU time matches the requests
//! counted.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::Notify,
    time::timeout,
};

use super::ntlm::{self, Identity};

/// A request or a response that takes longer than this is an error (bounds every run).
const IO_TIMEOUT: Duration = Duration::from_secs(5);

const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// What each client connection does.
#[derive(Clone)]
pub enum Mode {
    KeepAlive,
    NewConnection,
    Ntlm(Arc<Vec<Identity>>),
}

pub struct Plan {
    pub target: SocketAddr,
    pub mode: Mode,
    pub connections: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// Stop early once this many requests were measured.
    pub max_requests: u64,
}

/// What a run measured, and the probe's samples at the start and the end of the interval.
pub struct Outcome<T> {
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latencies of the measured requests, sorted, nanoseconds.
    pub latencies: Vec<u32>,
    pub before: T,
    pub after: T,
}

impl<T> Outcome<T> {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`th percentile latency in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        percentile(&self.latencies, p) as f64 / 1000.0
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// State shared by the connections of one run.
struct Shared {
    phase: AtomicU8,
    measured: AtomicU64,
    max_requests: u64,
    limit_reached: Notify,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }
}

/// One connection's counts; merged at the end (no shared writes per request).
#[derive(Default)]
struct Tally {
    latencies: Vec<u32>,
    completed: u64,
    errors: u64,
}

impl Tally {
    fn record(&mut self, started: Instant, shared: &Shared) {
        if shared.phase() != MEASURE {
            return;
        }
        let ns = u32::try_from(started.elapsed().as_nanos()).unwrap_or(u32::MAX);
        self.latencies.push(ns);
        self.completed += 1;
        if shared.measured.fetch_add(1, Ordering::Relaxed) + 1 == shared.max_requests {
            shared.limit_reached.notify_one();
        }
    }

    fn error(&mut self, e: &anyhow::Error, shared: &Shared) {
        if shared.phase() == MEASURE {
            self.errors += 1;
        }
        let mut first = shared
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert_with(|| format!("{e:#}"));
    }
}

/// Runs `plan` on this thread.
pub fn run<T>(plan: &Plan, probe: impl Fn() -> T) -> Result<Outcome<T>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the load generator's runtime")?
        .block_on(drive(plan, probe))
}

async fn drive<T>(plan: &Plan, probe: impl Fn() -> T) -> Result<Outcome<T>> {
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(WARMUP),
        measured: AtomicU64::new(0),
        max_requests: plan.max_requests,
        limit_reached: Notify::new(),
        first_error: Mutex::new(None),
    });
    let workers: Vec<_> = (0..plan.connections)
        .map(|i| {
            tokio::spawn(worker(
                i,
                plan.target,
                plan.mode.clone(),
                Arc::clone(&shared),
            ))
        })
        .collect();
    tokio::time::sleep(plan.warmup).await;
    let before = probe();
    let started = Instant::now();
    shared.phase.store(MEASURE, Ordering::Relaxed);
    tokio::select! {
        _ = tokio::time::sleep(plan.measure) => {}
        _ = shared.limit_reached.notified() => {}
    }
    shared.phase.store(STOP, Ordering::Relaxed);
    let after = probe();
    let elapsed = started.elapsed();
    let mut total = Tally::default();
    for w in workers {
        let t = timeout(IO_TIMEOUT * 2, w)
            .await
            .context("a load connection did not stop")?
            .context("a load connection panicked")?;
        total.latencies.extend(t.latencies);
        total.completed += t.completed;
        total.errors += t.errors;
    }
    total.latencies.sort_unstable();
    let first_error = shared
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    Ok(Outcome {
        completed: total.completed,
        errors: total.errors,
        first_error,
        elapsed,
        latencies: total.latencies,
        before,
        after,
    })
}

async fn worker(index: usize, target: SocketAddr, mode: Mode, shared: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    let mut round = 0usize;
    while shared.phase() != STOP {
        round += 1;
        let source = source_address(index + round * 64);
        let result = match &mode {
            Mode::KeepAlive => keepalive_session(target, &shared, &mut tally).await,
            Mode::NewConnection => one_connection(target, source, &shared, &mut tally).await,
            Mode::Ntlm(users) => {
                let id = &users[index % users.len()];
                one_handshake(target, source, id, round, &shared, &mut tally).await
            }
        };
        if let Err(e) = result {
            tally.error(&e, &shared);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    tally
}

/// Clients that open many connections spread them over 127.0.1.1–127.0.1.250, so neither side
/// runs short of ports.
pub fn source_address(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (n % 250) as u8))
}

async fn keepalive_session(target: SocketAddr, shared: &Shared, tally: &mut Tally) -> Result<()> {
    let mut conn = HttpConn::connect(target, None).await?;
    while shared.phase() != STOP {
        let started = Instant::now();
        conn.send(KEEPALIVE_REQUEST).await?;
        let head = conn.response().await?;
        ensure!(head.status == 200, "status {}", head.status);
        tally.record(started, shared);
        if head.close {
            return Ok(());
        }
    }
    Ok(())
}

/// Connect, request, response (the latency), then the server's close.
async fn one_connection(
    target: SocketAddr,
    source: IpAddr,
    shared: &Shared,
    tally: &mut Tally,
) -> Result<()> {
    let started = Instant::now();
    let mut conn = HttpConn::connect(target, Some(source)).await?;
    conn.send(CLOSE_REQUEST).await?;
    let head = conn.response().await?;
    ensure!(head.status == 200, "status {}", head.status);
    tally.record(started, shared);
    conn.wait_close().await
}

/// One NTLMv2 login on a new connection: the latency is the whole exchange.
async fn one_handshake(
    target: SocketAddr,
    source: IpAddr,
    id: &Identity,
    round: usize,
    shared: &Shared,
    tally: &mut Tally,
) -> Result<()> {
    let started = Instant::now();
    let mut conn = HttpConn::connect(target, Some(source)).await?;
    conn.send(&ntlm::type1_request()).await?;
    let head = conn.response().await?;
    ensure!(
        head.status == 401,
        "Type1 answered with status {}",
        head.status
    );
    let type2 = ntlm::decode(
        head.ntlm
            .as_deref()
            .context("a 401 without an NTLM challenge")?,
    )?;
    let client_challenge = (round as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .to_le_bytes();
    let type3 = ntlm::type3(id, &type2, client_challenge, ntlm::filetime_now())?;
    conn.send(&ntlm::type3_request(&type3)).await?;
    let head = conn.response().await?;
    ensure!(
        head.status == 200,
        "Type3 of {} answered with status {}",
        id.user,
        head.status
    );
    tally.record(started, shared);
    conn.wait_close().await
}

/// A client connection that reads responses with `Content-Length` bodies.
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

/// A response head, with the body already consumed.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub close: bool,
    /// The token of a `WWW-Authenticate: NTLM <token>` header.
    pub ntlm: Option<String>,
    len: usize,
    content_length: usize,
}

impl HttpConn {
    pub async fn connect(target: SocketAddr, source: Option<IpAddr>) -> Result<HttpConn> {
        let socket = TcpSocket::new_v4().context("socket")?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        let stream = timeout(IO_TIMEOUT, socket.connect(target))
            .await
            .with_context(|| format!("connect to {target} timed out"))?
            .with_context(|| format!("connect to {target}"))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: vec![0; 4096],
            filled: 0,
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .context("write timed out")?
            .context("write")
    }

    /// Reads one response.
    pub async fn response(&mut self) -> Result<Head> {
        let head = loop {
            if let Some(head) = parse_head(&self.buf[..self.filled])? {
                break head;
            }
            self.read_more().await?;
        };
        let total = head.len + head.content_length;
        while self.filled < total {
            self.read_more().await?;
        }
        self.buf.copy_within(total..self.filled, 0);
        self.filled -= total;
        Ok(head)
    }

    async fn read_more(&mut self) -> Result<()> {
        if self.filled == self.buf.len() {
            ensure!(self.buf.len() < 1 << 20, "response larger than 1 MiB");
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = timeout(IO_TIMEOUT, self.stream.read(&mut self.buf[self.filled..]))
            .await
            .context("read timed out")?
            .context("read")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.filled += n;
        Ok(())
    }

    /// Waits for the server to close (it was asked to), so the TIME_WAIT stays on its side.
    pub async fn wait_close(&mut self) -> Result<()> {
        let mut scratch = [0u8; 512];
        loop {
            let n = timeout(IO_TIMEOUT, self.stream.read(&mut scratch))
                .await
                .context("the server did not close the connection")?
                .context("read")?;
            if n == 0 {
                return Ok(());
            }
        }
    }
}

/// Parses a complete response head at the start of `buf`; `None` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        ensure!(buf.len() < 64 * 1024, "response head larger than 64 KiB");
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut head = Head {
        status,
        close: status_line.starts_with("HTTP/1.0"),
        ntlm: None,
        len: end + 4,
        content_length: 0,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        apply_header(&mut head, name.trim(), value.trim())?;
    }
    Ok(Some(head))
}

fn apply_header(head: &mut Head, name: &str, value: &str) -> Result<()> {
    if name.eq_ignore_ascii_case("content-length") {
        head.content_length = value.parse().context("bad Content-Length")?;
    } else if name.eq_ignore_ascii_case("connection") {
        head.close = value.to_ascii_lowercase().contains("close");
    } else if name.eq_ignore_ascii_case("transfer-encoding") {
        bail!("chunked responses are not expected from these servers ({value})");
    } else if name.eq_ignore_ascii_case("www-authenticate")
        && let Some(token) = value.strip_prefix("NTLM ")
    {
        head.ntlm = Some(token.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_once_complete() -> Result<()> {
        let r = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 17\r\nWWW-Authenticate: NTLM TlRMTQ==\r\n\r\n401 Unauthorized\n";
        assert_eq!(parse_head(&r[..30])?, None);
        let head = parse_head(r)?.context("complete")?;
        assert_eq!(head.status, 401);
        assert_eq!(head.ntlm.as_deref(), Some("TlRMTQ=="));
        assert_eq!(head.len + head.content_length, r.len());
        assert!(!head.close);
        let close =
            parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")?;
        assert!(close.context("complete")?.close);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        Ok(())
    }

    #[test]
    fn percentiles_by_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
