//! Resident memory per idle keep-alive client connection: the proxy's RSS before and after
//! `count` connections that each made one request and then stay open.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use tokio::{sync::Semaphore, task::JoinSet};

use super::{
    load::{HttpConn, source_address},
    procs::Server,
};

/// Connections being opened at once.
const OPENING: usize = 256;
/// The whole run (opening, settling, measuring) must finish within this.
const BOUND: Duration = Duration::from_secs(90);
/// Time for the proxy to settle after the last connection (freed request buffers and so on).
const SETTLE: Duration = Duration::from_secs(2);

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

pub struct IdleResult {
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub seconds_to_open: f64,
}

impl IdleResult {
    pub fn kib_per_connection(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64
            / self.connections.max(1) as f64
    }
}

/// Opens `count` connections to `target`, measures `server`'s RSS, closes them.
pub fn measure(target: SocketAddr, count: usize, server: &Server) -> Result<IdleResult> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the idle client's runtime")?
        .block_on(async {
            tokio::time::timeout(BOUND, measure_async(target, count, server))
                .await
                .with_context(|| format!("the idle-connection run took longer than {BOUND:?}"))?
        })
}

async fn measure_async(target: SocketAddr, count: usize, server: &Server) -> Result<IdleResult> {
    warm_up(target).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = server.rss_kib();
    let started = Instant::now();
    let conns = open(target, count).await?;
    let seconds_to_open = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let rss_after_kib = server.rss_kib();
    drop(conns);
    Ok(IdleResult {
        connections: count,
        rss_before_kib,
        rss_after_kib,
        seconds_to_open,
    })
}

/// A few requests first, so upstream connections and lazy state exist before the baseline.
async fn warm_up(target: SocketAddr) -> Result<()> {
    let mut conn = HttpConn::connect(target, None).await?;
    for _ in 0..100 {
        conn.send(REQUEST).await?;
        let head = conn.response().await?;
        ensure!(
            head.status == 200,
            "warm-up request got status {}",
            head.status
        );
    }
    Ok(())
}

async fn open(target: SocketAddr, count: usize) -> Result<Vec<HttpConn>> {
    let permits = Arc::new(Semaphore::new(OPENING));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        tasks.spawn(async move {
            let _permit = permit;
            open_one(target, i).await
        });
    }
    let mut conns = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        conns.push(joined.context("an opening task panicked")??);
    }
    Ok(conns)
}

async fn open_one(target: SocketAddr, i: usize) -> Result<HttpConn> {
    let mut conn = HttpConn::connect(target, Some(source_address(i)))
        .await
        .with_context(|| format!("idle connection {i}"))?;
    conn.send(REQUEST).await?;
    let head = conn.response().await?;
    ensure!(
        head.status == 200,
        "idle connection {i}: status {}",
        head.status
    );
    ensure!(!head.close, "idle connection {i}: the server closed it");
    Ok(conn)
}
