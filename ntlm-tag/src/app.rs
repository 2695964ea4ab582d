//! Start-up and shutdown of the gateway: kernel programs first (so listeners land in the proxy's own
//! cgroup), then listeners, then serve until SIGTERM/SIGINT and drain.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tokio_util::task::TaskTracker;

use crate::{
    admin::{self, AdminState},
    cli::EbpfMode,
    config::Config,
    identity::{Identifier, UidGenerator, trust::TrustedSources},
    kernel::{KernelOptions, KernelTracker},
    metrics::Metrics,
    proxy::{self, Gateway, rewrite::StampPolicy},
    registry::Registry,
    upstream::Upstream,
};

/// Exit code when `--ebpf required` cannot be honoured (EX_UNAVAILABLE).
pub const EXIT_EBPF_UNAVAILABLE: u8 = 69;

#[derive(Debug, thiserror::Error)]
#[error("--ebpf required, but the kernel programs are not running: {0}")]
pub struct EbpfRequiredError(String);

pub async fn run(config: Config) -> Result<()> {
    let (kernel, ebpf_status) = start_kernel(&config)?;
    if config.identity.template.is_reusable() {
        tracing::warn!(
            template = config.identity.template.as_str(),
            "allow_reusable_ids: connection ids have no {{uid}} and repeat when a client ip:port is reused \
             (NAT, terminal servers, reconnects); a new client can then inherit another user's NTLM session"
        );
    }

    let mut listeners = Vec::new();
    for l in &config.listeners {
        let listener = TcpListener::bind(l.address).await.with_context(|| {
            format!(
                "cannot listen on {} (in use? ports below 1024 need root or CAP_NET_BIND_SERVICE)",
                l.address
            )
        })?;
        listeners.push((listener, l.clone()));
    }
    let admin_listener = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on admin address {addr}"))?,
        ),
        None => None,
    };

    let upstream = Arc::new(Upstream::new(
        &config.backends,
        config.mode,
        config.balance,
        &config.timeouts,
    ));
    if let Some(check) = &config.health_check {
        upstream.spawn_health_checks(check.clone());
    }
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::default());
    let gateway = Arc::new(Gateway {
        identifier: Identifier::new(kernel.clone()),
        uids: UidGenerator::new().context("cannot draw the random instance nonce")?,
        template: config.identity.template.clone(),
        policy: StampPolicy {
            id_header: config.identity.header.clone(),
            forwarded_headers: config.identity.forwarded_headers,
        },
        upstream: Arc::clone(&upstream),
        registry: Arc::clone(&registry),
        timeouts: config.timeouts,
        trusted: TrustedSources::new(&config.trusted_lbs),
        metrics: Arc::clone(&metrics),
        http2: config.http2,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let mut addresses = Vec::new();
    for (listener, listener_config) in listeners {
        addresses.push(listener.local_addr()?.to_string());
        tokio::spawn(proxy::serve_listener(
            listener,
            listener_config,
            Arc::clone(&gateway),
            shutdown_rx.clone(),
            tracker.clone(),
        ));
    }
    let admin_address = match admin_listener {
        Some(listener) => {
            let address = listener.local_addr()?.to_string();
            let state = Arc::new(AdminState {
                registry: Arc::clone(&registry),
                metrics: Arc::clone(&metrics),
                kernel: kernel.clone(),
                ebpf_status: ebpf_status.clone(),
            });
            tokio::spawn(admin::serve(listener, state, shutdown_rx.clone()));
            Some(address)
        }
        None => None,
    };
    drop(kernel);
    tracing::info!(
        listen = ?addresses,
        admin = ?admin_address,
        backends = ?config.backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        header = config.identity.header.as_str(),
        ebpf = %ebpf_status,
        "ntlm-tag ready"
    );

    wait_for_stop_signal().await?;
    tracing::info!(
        connections = registry.len(),
        deadline_secs = config.timeouts.drain.as_secs_f64(),
        "stopping: no new connections, draining"
    );
    let _ = shutdown_tx.send(true);
    tracker.close();
    if tokio::time::timeout(config.timeouts.drain, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = registry.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    Ok(())
}

/// Loads the kernel programs as `config.ebpf.mode` asks. Returns the tracker and a status line.
fn start_kernel(config: &Config) -> Result<(Option<Arc<KernelTracker>>, String)> {
    match config.ebpf.mode {
        EbpfMode::Off => {
            tracing::info!(
                "eBPF off (--ebpf off): connection identities are the accepted peer addresses; ids still \
                 never repeat, but behind an L4 balancer the client shown is the balancer"
            );
            Ok((None, "off".to_string()))
        }
        mode => match KernelTracker::start(&KernelOptions {
            map_entries: config.ebpf.map_entries,
            toa_kind: config.ebpf.toa_kind,
            trusted_lbs: config.trusted_lbs.clone(),
            xdp_interfaces: config.ebpf.xdp_interfaces.clone(),
        }) {
            Ok(k) => Ok((Some(Arc::new(k)), "attached".to_string())),
            Err(e) if mode == EbpfMode::Required => Err(EbpfRequiredError(format!("{e:#}")).into()),
            Err(e) => {
                tracing::warn!(
                    reason = %e,
                    "eBPF unavailable, falling back to the accepted peer address for every connection \
                     (ids still never repeat; behind an L4 balancer the client shown is the balancer). \
                     Fix the reason above or use --ebpf required to refuse to start without it"
                );
                Ok((None, format!("unavailable: {e}")))
            }
        },
    }
}

async fn wait_for_stop_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

/// Checks that the runtime can be built with `workers` threads.
pub fn build_runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("ntlm-tag");
    if workers > 0 {
        builder.worker_threads(workers);
    }
    match builder.build() {
        Ok(rt) => Ok(rt),
        Err(e) => bail!("cannot start the runtime: {e}"),
    }
}
