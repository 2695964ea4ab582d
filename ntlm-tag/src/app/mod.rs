//! Start-up and shutdown of the gateway: kernel programs first (so listeners land in the proxy's own
//! cgroup), then listeners, then the user switch (all three before the runtime's threads exist), then
//! serve until SIGTERM/SIGINT and drain, or until a successor (`ntlm-tag upgrade`) takes the
//! listeners over and the connections of this process have closed (see [`crate::handover`]).

mod prepare;
mod reload;
mod runtime;
mod signals;
mod upgrade;

use std::sync::{Arc, atomic::AtomicUsize};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::task::TaskTracker;

use crate::{
    admin::{self, AdminListener, AdminState, PrivateAccess, ReloadOutcome},
    cli::RunArgs,
    config::Config,
    guard::LockoutGuard,
    handover::{self},
    identity::{IdDisplay, Identifier, UidGenerator},
    kernel::KernelTracker,
    metrics::Metrics,
    proxy::{self, Gateway, rewrite::StampPolicy},
    registry::Registry,
    service::{self, ServiceManager, Snapshot},
};

pub use prepare::{EbpfRequiredError, Prepared, prepare};
pub use reload::{BridgingMismatch, verify_bridging};
pub use runtime::{build_runtime, resolve_workers};

use prepare::watch_local_addresses;
use reload::{build_live, reload, warn_if_lockout_off};
use signals::{Signal, Signals};
use upgrade::{drain_after_upgrade, handover_sockets, take_over};

/// How the line `ntlm-tag upgrade` prints on stdout once it took over begins.
pub const TOOK_OVER: &str = "ntlm-tag: upgrade done";

/// Exit code when `--ebpf required` cannot be honoured (EX_UNAVAILABLE).
pub const EXIT_EBPF_UNAVAILABLE: u8 = 69;

/// Exit code when the user switch fails or leaves more than intended (EX_NOPERM).
pub const EXIT_PRIVILEGES: u8 = 77;

/// Runs the gateway until SIGTERM/SIGINT. `args` are kept to re-read the file on SIGHUP or an admin
/// `POST /reload` (flags still override it). Tells systemd (when it started the gateway) when it is
/// ready, reloading and stopping.
pub async fn run(config: Config, args: RunArgs, prepared: Prepared) -> Result<()> {
    let Prepared {
        kernel,
        ebpf_status,
        listeners,
        admin_listener,
        upgrade_socket,
        predecessor,
    } = prepared;
    if let Some(k) = &kernel {
        k.forward_kernel_log();
    }
    warn_about_opt_ins(&config);
    // Second descriptors of every socket, for a successor (the runtime owns the first ones).
    let handover = match upgrade_socket.as_ref() {
        Some(socket) => Some(Arc::new(
            handover_sockets(
                &listeners,
                admin_listener
                    .as_ref()
                    .zip(config.admin.as_ref().map(|a| a.endpoint.to_string())),
                socket,
                kernel.as_deref(),
            )
            .context("cannot prepare the sockets for an upgrade")?,
        )),
        None => None,
    };
    let listeners = listeners
        .into_iter()
        .map(|(l, c)| Ok((TcpListener::from_std(l)?, c)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot register the listeners")?;

    let gateway = start_gateway(&config, kernel.clone()).await?;
    let (registry, metrics) = (Arc::clone(&gateway.registry), Arc::clone(&gateway.metrics));

    // Subscribed here, on the runtime (the socket is registered with it); rtnetlink address
    // announcements need no privilege.
    if let (Some(watch), Some(k)) = (watch_local_addresses(&config, kernel.as_ref()), &kernel) {
        tokio::spawn(watch.run(Arc::downgrade(k)));
    }
    let mut signals = Signals::install()?;
    if let Some(predecessor) = predecessor {
        take_over(
            predecessor,
            kernel.as_deref(),
            gateway.identifier.uid_nonce(),
            Arc::clone(&metrics),
        )
        .await?;
    }
    let (reload_tx, mut reload_requests) = mpsc::channel::<oneshot::Sender<ReloadOutcome>>(4);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Fired when a successor takes the listeners: stop accepting, keep serving.
    let (hand_over_tx, hand_over_rx) = watch::channel(false);
    // Fired at a stop and at a hand-over: the admin endpoint and the upgrade socket.
    let (stop_serving_tx, stop_serving_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    let mut addresses = Vec::new();
    let mut accepting = Vec::new();
    for (listener, listener_config) in listeners {
        addresses.push(listener.local_addr()?.to_string());
        accepting.push(tokio::spawn(proxy::serve_listener(
            listener,
            listener_config,
            Arc::clone(&gateway),
            proxy::ListenerStops {
                shutdown: shutdown_rx.clone(),
                hand_over: hand_over_rx.clone(),
            },
            tracker.clone(),
        )));
    }
    let (successor_tx, mut successors) = tokio::sync::mpsc::channel(1);
    // After a successor failed: it may have swapped its XDP program in just before it failed.
    let restore_xdp = {
        let kernel = kernel.clone();
        move || {
            if let Some(k) = &kernel {
                k.restore_xdp();
            }
        }
    };
    if let (Some(socket), Some(handover)) = (upgrade_socket, handover) {
        tokio::spawn(handover::offer_to_successors(
            socket,
            handover,
            successor_tx,
            stop_serving_rx.clone(),
            restore_xdp.clone(),
        ));
    }
    let admin_address = admin_listener.map(|listener| {
        serve_admin(
            listener,
            &config,
            &gateway,
            kernel.clone(),
            ebpf_status.clone(),
            reload_tx,
            stop_serving_rx.clone(),
        )
    });
    tracing::info!(
        listen = ?addresses,
        admin = ?admin_address,
        backends = ?config.backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        routes = ?config.routes.iter().map(|r| r.path_prefix.as_str()).collect::<Vec<_>>(),
        header = config.identity.header.as_str(),
        uid_nonce = gateway.identifier.uid_nonce(),
        ebpf = %ebpf_status,
        "ntlm-tag ready"
    );
    let snapshot = {
        let gateway = Arc::clone(&gateway);
        move || snapshot(&gateway)
    };
    let manager = Arc::new(ServiceManager::from_env());
    manager.ready(&snapshot());
    tokio::spawn(service::keep_status_current(
        Arc::clone(&manager),
        snapshot.clone(),
        shutdown_rx.clone(),
    ));

    // Reloads run here, one at a time, whether a signal or the admin endpoint asked: each admin
    // request is answered with the outcome of a reload that began after it arrived.
    let mut running = config;
    let successor = loop {
        let reply = tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break None,
                Signal::Reload => None,
            },
            Some(reply) = reload_requests.recv() => {
                tracing::info!("reload requested on the admin endpoint");
                Some(reply)
            }
            Some(successor) = successors.recv() => break Some(successor),
        };
        manager.reloading();
        let outcome = reload(&args, &mut running, &gateway, kernel.as_deref(), &metrics).await;
        manager.reloaded(
            outcome.as_ref().map(|_| ()).map_err(String::as_str),
            &snapshot(),
        );
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    };
    // Requests that arrive from now on are answered "stopping" (their sender is gone).
    drop(reload_requests);
    // After a hand-over the service goes on in the successor: telling the service manager that it
    // stops would make it stop the successor too.
    if successor.is_none() {
        manager.stopping(registry.len());
    }
    drop(kernel);
    let _ = stop_serving_tx.send(true);
    if let Some(successor) = successor {
        let _ = hand_over_tx.send(true);
        if hand_over(
            successor,
            accepting,
            &tracker,
            &gateway,
            &mut signals,
            restore_xdp,
        )
        .await
        {
            return Ok(());
        }
    }
    drain(&gateway, &shutdown_tx, &tracker).await;
    Ok(())
}

/// Settings that weaken safety on purpose: said at every start.
fn warn_about_opt_ins(config: &Config) {
    if config.identity.template.is_reusable() {
        tracing::warn!(
            template = config.identity.template.as_str(),
            "allow_reusable_ids: connection ids have no {{uid}} and repeat when a client ip:port is reused \
             (NAT, terminal servers, reconnects); a new client can then inherit another user's NTLM session"
        );
    }
    if config.show_full_ids {
        tracing::warn!(
            "show_full_ids: logs and /connections show full connection ids; to a backend that keys \
             sessions on the id header (Jespa) an id is a credential, so whoever reads them can act \
             as that connection. Keep the logs and the admin endpoint private, or turn it off"
        );
    }
}

/// The gateway every listener serves with: the id machinery, the shared tables and counters, and
/// the reloadable part of the configuration.
async fn start_gateway(
    config: &Config,
    kernel: Option<Arc<KernelTracker>>,
) -> Result<Arc<Gateway>> {
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::default());
    verify_bridging(config).await?;
    let live = build_live(config, &metrics)?;
    let lockout = Arc::new(LockoutGuard::new(config.lockout.clone()));
    warn_if_lockout_off(config);
    Ok(Arc::new(Gateway {
        identifier: Arc::new(Identifier::new(
            kernel,
            UidGenerator::new().context("cannot draw the random uid key and instance nonce")?,
            config.identity.template.clone(),
            Arc::clone(&metrics),
        )),
        id_display: Arc::new(
            IdDisplay::new(config.show_full_ids)
                .context("cannot draw the random key for id hashes")?,
        ),
        policy: StampPolicy::new(
            config.identity.header.clone(),
            config.identity.forwarded_headers,
        ),
        registry: Arc::clone(&registry),
        metrics: Arc::clone(&metrics),
        lockout: Arc::clone(&lockout),
        http2: config.http2,
        live: ArcSwap::from_pointee(live),
        open: AtomicUsize::new(0),
    }))
}

/// Serves the admin endpoint until `stop_serving`; returns the address it listens on.
fn serve_admin(
    listener: AdminListener,
    config: &Config,
    gateway: &Arc<Gateway>,
    kernel: Option<Arc<KernelTracker>>,
    ebpf_status: String,
    reload: mpsc::Sender<oneshot::Sender<ReloadOutcome>>,
    stop_serving: watch::Receiver<bool>,
) -> String {
    let address = listener.describe();
    let private = match (
        &listener,
        config.admin.as_ref().and_then(|a| a.token.as_ref()),
    ) {
        (AdminListener::Unix(..), _) => PrivateAccess::Socket,
        (AdminListener::Tcp(_), Some(token)) => PrivateAccess::Bearer(token.clone()),
        (AdminListener::Tcp(_), None) => {
            tracing::info!(
                "admin on TCP without admin_token_file: /healthz and /metrics only; \
                 /connections, /kernel and /reload answer 403"
            );
            PrivateAccess::Closed
        }
    };
    let state = Arc::new(AdminState {
        registry: Arc::clone(&gateway.registry),
        metrics: Arc::clone(&gateway.metrics),
        lockout: Arc::clone(&gateway.lockout),
        kernel,
        ebpf_status,
        private,
        backends: {
            let gateway = Arc::clone(gateway);
            Arc::new(move || {
                let live = gateway.live.load();
                live.upstream.states()
            })
        },
        reload,
    });
    tokio::spawn(admin::serve(listener, state, stop_serving));
    address
}

/// After a successor said it is ready: stop accepting, release the listeners to it, and serve this
/// process's connections until they close (true) or the upgrade drain ends (false).
async fn hand_over(
    successor: handover::Successor,
    accepting: Vec<tokio::task::JoinHandle<usize>>,
    tracker: &TaskTracker,
    gateway: &Gateway,
    signals: &mut Signals,
    restore_xdp: impl Fn(),
) -> bool {
    let mut drained = 0;
    for task in accepting {
        drained += task.await.unwrap_or(0);
    }
    tracker.close();
    let draining = gateway.open.load(std::sync::atomic::Ordering::Relaxed);
    let pid = successor.pid;
    let mut reports = None;
    match tokio::task::spawn_blocking(move || successor.release(drained, draining)).await {
        Ok(Ok(r)) => reports = Some(r),
        Ok(Err(e)) => {
            tracing::error!(
                successor = pid,
                error = %e,
                "upgrade: the successor went away after it said it was ready, and this process \
                 no longer accepts: nothing accepts new connections now; start the service again"
            );
            // This process's own connections still need their tunnels decapsulated and joined.
            restore_xdp();
        }
        Err(e) => tracing::error!(error = %e, "upgrade: the hand-over task failed"),
    }
    tracing::info!(
        successor = pid,
        accepted_from_queue = drained,
        draining,
        deadline_secs = gateway.live.load().timeouts.upgrade_drain.as_secs_f64(),
        "upgrade: the successor accepts new connections now; serving this process's own until \
         they close or the upgrade drain deadline passes"
    );
    let all_closed = drain_after_upgrade(gateway, tracker, signals, reports.as_mut()).await;
    let left = gateway.open.load(std::sync::atomic::Ordering::Relaxed);
    if let Some(r) = reports {
        r.drained(if all_closed { 0 } else { left });
    }
    all_closed
}

/// Stops accepting and gives open connections `timeouts.drain_secs` to finish.
async fn drain(gateway: &Gateway, shutdown: &watch::Sender<bool>, tracker: &TaskTracker) {
    let drain = gateway.live.load().timeouts.drain;
    tracing::info!(
        connections = gateway.registry.len(),
        deadline_secs = drain.as_secs_f64(),
        "stopping: no new connections, draining"
    );
    let _ = shutdown.send(true);
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = gateway.registry.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
}

/// What the service manager's status line shows now.
fn snapshot(gateway: &Gateway) -> Snapshot {
    let live = gateway.live.load();
    let backends = live.upstream.backends();
    Snapshot {
        connections: gateway.registry.len(),
        backends_up: backends.iter().filter(|b| b.is_up()).count(),
        backends: backends.len(),
    }
}
