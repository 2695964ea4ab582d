//! Start-up and shutdown of the gateway: kernel programs first (so listeners land in the proxy's own
//! cgroup), then listeners, then the user switch (all three before the runtime's threads exist), then
//! serve until SIGTERM/SIGINT and drain, or until a successor (`ntlm-tag upgrade`) takes the
//! listeners over and the connections of this process have closed (see [`crate::handover`]).

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::{
    net::TcpListener,
    signal::unix::SignalKind,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::task::TaskTracker;

use crate::{
    admin::{self, AdminListener, AdminState, PrivateAccess, ReloadOutcome},
    cli::{EbpfMode, RunArgs},
    config::{Config, ListenerConfig},
    guard::LockoutGuard,
    handover::{self, Handover, Predecessor, UpgradeSocket},
    identity::{IdDisplay, Identifier, UidGenerator, trust::TrustedSources},
    kernel::{KernelOptions, KernelTracker, local_addrs, privileges},
    metrics::{Metrics, ReloadResult},
    proxy::{self, Gateway, Live, rewrite::StampPolicy},
    registry::Registry,
    service::{self, ServiceManager, Snapshot},
    upstream::Upstream,
};

/// How the line `ntlm-tag upgrade` prints on stdout once it took over begins.
pub const TOOK_OVER: &str = "ntlm-tag: upgrade done";

/// Exit code when `--ebpf required` cannot be honoured (EX_UNAVAILABLE).
pub const EXIT_EBPF_UNAVAILABLE: u8 = 69;

/// Exit code when the user switch fails or leaves more than intended (EX_NOPERM).
pub const EXIT_PRIVILEGES: u8 = 77;

#[derive(Debug, thiserror::Error)]
#[error("--ebpf required, but the kernel programs are not running: {0}")]
pub struct EbpfRequiredError(String);

/// What start-up acquired while privileged: the kernel programs, the bound listeners, and the user
/// switch. Made by [`prepare`] before the async runtime exists.
pub struct Prepared {
    kernel: Option<Arc<KernelTracker>>,
    ebpf_status: String,
    listeners: Vec<(std::net::TcpListener, Arc<ListenerConfig>)>,
    admin_listener: Option<AdminListener>,
    upgrade_socket: Option<UpgradeSocket>,
    /// With `ntlm-tag upgrade`: the running gateway, until it released its listeners to this one.
    predecessor: Option<Predecessor>,
}

/// The privileged part of start-up, on the process's only thread: attach the kernel programs (so
/// that the listeners land in the proxy's own cgroup), bind, then switch user. Capabilities and
/// no_new_privs belong to each thread; the runtime's threads, created after this, inherit exactly
/// what the switch left.
///
/// With `upgrade`, the sockets come from the gateway running on `upgrade_socket` (those the
/// configuration still names), and the kernel programs are attached in the cgroup they belong to.
pub fn prepare(config: &Config, upgrade: bool) -> Result<Prepared> {
    log_warnings(config);
    let (predecessor, mut inherited) = if upgrade {
        let path = config.upgrade_socket.as_deref().context(
            "`ntlm-tag upgrade` takes over through upgrade_socket, and the configuration sets none",
        )?;
        if !config.ebpf.xdp_interfaces.is_empty() {
            // XDP takes one program per interface and mode, held by the running gateway; taking it
            // over is not implemented, so refuse before the running gateway is touched.
            bail!(
                "`ntlm-tag upgrade` does not support `xdp` interfaces yet (the running gateway holds \
                 their XDP attachment); restart the service instead"
            );
        }
        let (predecessor, inherited) = handover::take_over(path)?;
        (Some(predecessor), Some(inherited))
    } else {
        (None, None)
    };
    // First: a second gateway started by mistake stops here, naming `ntlm-tag upgrade`.
    let upgrade_socket = match &config.upgrade_socket {
        Some(path) => Some(
            match inherited.as_mut().and_then(|i| i.take_upgrade_socket(path)) {
                Some(fd) => UpgradeSocket::inherited(fd, path)
                    .context("cannot use the upgrade socket the running gateway handed over")?,
                None => UpgradeSocket::bind(path)?,
            },
        ),
        None => None,
    };
    let (mut kernel, mut ebpf_status) = match &inherited {
        Some(i) if i.cgroup.is_none() && config.ebpf.mode != EbpfMode::Off => {
            let problem = "the running gateway has no kernel programs, so its listeners belong to no \
                           cgroup of ntlm-tag's and a kernel program of this process would record none \
                           of their connections; restart the service instead of upgrading to turn eBPF on";
            if config.ebpf.mode == EbpfMode::Required {
                return Err(EbpfRequiredError(problem.to_string()).into());
            }
            tracing::warn!("{problem}; connections use peer addresses");
            (None, format!("unavailable: {problem}"))
        }
        Some(i) => start_kernel(config, i.cgroup.as_deref())?,
        None => start_kernel(config, None)?,
    };
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let listener = match inherited.as_mut().and_then(|i| i.take_listener(l.address)) {
            Some(listener) => listener,
            None => bind(l.address).with_context(|| {
                format!(
                    "cannot listen on {} (in use? ports below 1024 need root or CAP_NET_BIND_SERVICE)",
                    l.address
                )
            })?,
        };
        listeners.push((listener, Arc::new(l.clone())));
    }
    let admin_listener = match &config.admin {
        Some(admin) => match inherited
            .as_mut()
            .and_then(|i| i.take_admin(&admin.endpoint.to_string()))
        {
            Some(fd) => Some(
                AdminListener::inherited(&admin.endpoint, fd)
                    .context("cannot use the admin socket the running gateway handed over")?,
            ),
            None => {
                // A unix socket belongs to the service user, so that it (and root) can read it
                // after the switch, and the gateway can remove it at exit.
                let owner = match &config.user {
                    Some(user) => Some(privileges::lookup_user(user)?),
                    None => None,
                };
                Some(AdminListener::bind(&admin.endpoint, owner)?)
            }
        },
        None => None,
    };
    if let Some(inherited) = inherited {
        inherited.close_unused();
    }
    if let Some(user) = &config.user {
        let records_usable = switch_user(user, kernel.as_deref(), config.ebpf.mode)?;
        if !records_usable {
            kernel = None;
            ebpf_status = "unavailable: map lookups refused after the user switch".to_string();
        }
    } else if running_as_root() {
        tracing::warn!(
            "running as root for the whole life of the process: set `user` (e.g. \"ntlm-tag\") to switch \
             after start-up and keep only what kernel map lookups need"
        );
    }
    Ok(Prepared {
        kernel,
        ebpf_status,
        listeners,
        admin_listener,
        upgrade_socket,
        predecessor,
    })
}

/// Switches to `user`, keeping only what map lookups need, and checks that a lookup works after it.
/// Returns whether the kernel's records can still be used; when they cannot, `--ebpf required`
/// fails start-up and `auto` warns once (connections then use peer addresses).
fn switch_user(user: &str, kernel: Option<&KernelTracker>, mode: EbpfMode) -> Result<bool> {
    let lookup = kernel.map(|k| move || k.lookups_work());
    let switched = privileges::drop_to(user, lookup.as_ref().map(|f| f as &dyn Fn() -> bool))?;
    tracing::info!(
        %user,
        uid = switched.uid,
        gid = switched.gid,
        kept = %switched.kept(),
        why = %switched.needs.reason,
        "switched user; every thread holds only the capabilities kept (permitted and effective), \
         nothing inheritable or ambient, no_new_privs set"
    );
    let Some(k) = kernel else {
        return Ok(true);
    };
    if k.lookups_work() {
        return Ok(true);
    }
    let problem = format!(
        "kernel map lookups fail after switching to {user:?} ({}); run a kernel from 5.19, or set \
         kernel.unprivileged_bpf_disabled to 0 on 5.8 to 5.18",
        switched.needs.reason
    );
    if mode == EbpfMode::Required {
        return Err(EbpfRequiredError(problem).into());
    }
    tracing::warn!(
        "{problem}; connections use peer addresses (ids still never repeat; behind an L4 balancer the \
         client shown is the balancer). --ebpf required refuses to start instead"
    );
    Ok(false)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A listening socket as tokio would make it (SO_REUSEADDR, backlog 1024), made without a runtime.
fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

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
    if config.identity.template.is_reusable() {
        tracing::warn!(
            template = config.identity.template.as_str(),
            "allow_reusable_ids: connection ids have no {{uid}} and repeat when a client ip:port is reused \
             (NAT, terminal servers, reconnects); a new client can then inherit another user's NTLM session"
        );
    }
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
    if config.show_full_ids {
        tracing::warn!(
            "show_full_ids: logs and /connections show full connection ids; to a backend that keys \
             sessions on the id header (Jespa) an id is a credential, so whoever reads them can act \
             as that connection. Keep the logs and the admin endpoint private, or turn it off"
        );
    }

    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::default());
    verify_bridging(&config).await?;
    let live = build_live(&config, &metrics)?;
    let lockout = Arc::new(LockoutGuard::new(config.lockout.clone()));
    warn_if_lockout_off(&config);
    let gateway = Arc::new(Gateway {
        identifier: Arc::new(Identifier::new(
            kernel.clone(),
            UidGenerator::new().context("cannot draw the random uid key and instance nonce")?,
            config.identity.template.clone(),
            Arc::clone(&metrics),
        )),
        id_display: IdDisplay::new(config.show_full_ids)
            .context("cannot draw the random key for id hashes")?,
        policy: StampPolicy {
            id_header: config.identity.header.clone(),
            forwarded_headers: config.identity.forwarded_headers,
        },
        registry: Arc::clone(&registry),
        metrics: Arc::clone(&metrics),
        lockout: Arc::clone(&lockout),
        http2: config.http2,
        live: ArcSwap::from_pointee(live),
        open: AtomicUsize::new(0),
    });

    // Subscribed here, on the runtime (the socket is registered with it); rtnetlink address
    // announcements need no privilege.
    if let (Some(watch), Some(k)) = (watch_local_addresses(&config, kernel.as_ref()), &kernel) {
        tokio::spawn(watch.run(Arc::downgrade(k)));
    }
    let mut signals = Signals::install()?;
    if let Some(predecessor) = predecessor {
        take_over(
            predecessor,
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
    if let (Some(socket), Some(handover)) = (upgrade_socket, handover) {
        tokio::spawn(handover::offer_to_successors(
            socket,
            handover,
            successor_tx,
            stop_serving_rx.clone(),
        ));
    }
    let admin_address = match admin_listener {
        Some(listener) => {
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
                registry: Arc::clone(&registry),
                metrics: Arc::clone(&metrics),
                lockout: Arc::clone(&lockout),
                kernel: kernel.clone(),
                ebpf_status: ebpf_status.clone(),
                private,
                backends: {
                    let gateway = Arc::clone(&gateway);
                    Arc::new(move || {
                        let live = gateway.live.load();
                        live.upstream.states()
                    })
                },
                reload: reload_tx,
            });
            tokio::spawn(admin::serve(listener, state, stop_serving_rx.clone()));
            Some(address)
        }
        None => None,
    };
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
            Ok(Err(e)) => tracing::error!(
                successor = pid,
                error = %e,
                "upgrade: the successor went away after it said it was ready, and this process \
                 no longer accepts: nothing accepts new connections now; start the service again"
            ),
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
        let all_closed =
            drain_after_upgrade(&gateway, &tracker, &mut signals, reports.as_mut()).await;
        let left = gateway.open.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = reports {
            r.drained(if all_closed { 0 } else { left });
        }
        if all_closed {
            return Ok(());
        }
    }
    let drain = gateway.live.load().timeouts.drain;
    tracing::info!(
        connections = registry.len(),
        deadline_secs = drain.as_secs_f64(),
        "stopping: no new connections, draining"
    );
    let _ = shutdown_tx.send(true);
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = registry.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
    Ok(())
}

/// How often a process draining after an upgrade says how many connections it still serves.
const DRAIN_PROGRESS_EVERY: Duration = Duration::from_secs(60);

/// How often the successor's metrics learn how many connections this process still serves.
const REPORT_TO_SUCCESSOR_EVERY: Duration = Duration::from_secs(1);

/// After a hand-over: serves the remaining connections until the last one closes (true), or until
/// `timeouts.upgrade_drain_secs` passes or SIGTERM arrives (false: the caller closes them).
async fn drain_after_upgrade(
    gateway: &Gateway,
    tracker: &TaskTracker,
    signals: &mut Signals,
    mut reports: Option<&mut handover::DrainReports>,
) -> bool {
    let open = || gateway.open.load(std::sync::atomic::Ordering::Relaxed);
    let mut report_every = tokio::time::interval(REPORT_TO_SUCCESSOR_EVERY);
    let deadline = tokio::time::Instant::now() + gateway.live.load().timeouts.upgrade_drain;
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + DRAIN_PROGRESS_EVERY,
        DRAIN_PROGRESS_EVERY,
    );
    loop {
        tokio::select! {
            _ = tracker.wait() => {
                tracing::info!("upgrade: the last connection of this process closed; exiting");
                return true;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    connections = open(),
                    "upgrade drain deadline passed (timeouts.upgrade_drain_secs); closing this \
                     process's remaining connections (their clients reconnect to the new process \
                     and log in again)"
                );
                return false;
            }
            _ = progress.tick() => {
                tracing::info!(connections = open(), "upgrade: still serving this process's connections");
            }
            _ = report_every.tick() => {
                if let Some(r) = reports.as_deref_mut() {
                    r.draining(open());
                }
            }
            signal = signals.next() => match signal {
                Signal::Stop => return false,
                Signal::Reload => tracing::info!(
                    "reload ignored: this process handed its listeners over and only drains; \
                     reload the new one"
                ),
            },
        }
    }
}

/// The successor's side of a hand-over: ready, so the predecessor may stop accepting.
async fn take_over(predecessor: Predecessor, uid_nonce: &str, metrics: Arc<Metrics>) -> Result<()> {
    let pid = predecessor.pid;
    let nonce = uid_nonce.to_string();
    let (drained, draining) =
        tokio::task::spawn_blocking(move || predecessor.hand_over(&nonce, metrics))
            .await
            .context("the hand-over task failed")?
            .context("the running gateway did not release its listeners; it keeps serving")?;
    tracing::info!(
        predecessor = pid,
        predecessor_accepted_from_queue = drained,
        predecessor_draining = draining,
        "upgrade: took the listeners over; the old process serves its own connections until they close"
    );
    // For whoever started `ntlm-tag upgrade` (an operator's terminal waits for this line). Best
    // effort: nobody may be reading any more, and that must not stop the gateway.
    let _ = writeln!(
        std::io::stdout(),
        "{TOOK_OVER}: pid {} serves new connections; pid {pid} serves its {draining} until they close",
        std::process::id()
    );
    Ok(())
}

/// Second descriptors of the sockets, and the cgroup they belong to, for a successor.
fn handover_sockets(
    listeners: &[(std::net::TcpListener, Arc<ListenerConfig>)],
    admin: Option<(&AdminListener, String)>,
    upgrade: &UpgradeSocket,
    kernel: Option<&KernelTracker>,
) -> std::io::Result<Handover> {
    let listeners = listeners
        .iter()
        .map(|(l, _)| Ok((l.local_addr()?, OwnedFd::from(l.try_clone()?))))
        .collect::<std::io::Result<_>>()?;
    let admin = match admin {
        Some((listener, endpoint)) => Some((endpoint, listener.dup()?)),
        None => None,
    };
    Ok(Handover {
        pid: std::process::id(),
        cgroup: kernel.map(|k| k.cgroup_path().to_path_buf()),
        listeners,
        admin,
        upgrade: upgrade.dup()?,
        upgrade_path: upgrade.path().to_path_buf(),
    })
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

/// With `epa_bridging`, a backend presenting another certificate than the listeners (a
/// configuration that would refuse every Extended Protection login).
#[derive(Debug, thiserror::Error)]
#[error(
    "epa_bridging: a backend presents another certificate than the listeners (see the lines above); \
     Extended Protection logins would be refused, so the configuration is not applied"
)]
pub struct BridgingMismatch;

/// `epa_bridging`: fetches each TLS backend's certificate and compares it with the listeners'
/// (each finding is logged). A backend that cannot be reached is a warning, not a refusal: it
/// may come up later, and its logins fail visibly if its certificate differs.
pub async fn verify_bridging(config: &Config) -> Result<()> {
    if !config.epa_bridging {
        return Ok(());
    }
    let findings = crate::epa::bridging::verify(
        &config.listeners,
        &config.all_backends(),
        config.timeouts.upstream_connect,
    )
    .await?;
    if crate::epa::bridging::log(&findings) {
        return Err(BridgingMismatch.into());
    }
    Ok(())
}

/// The reloadable part of the configuration, ready to serve.
fn build_live(config: &Config, metrics: &Arc<Metrics>) -> Result<Live> {
    if let Some(warning) = config.mode.warning() {
        tracing::warn!("{warning}");
    }
    let upstream = Upstream::new(
        &config.backends,
        &config.routes,
        config.mode,
        config.balance,
        &config.timeouts,
        config.limits.max_upstream_per_backend,
        Arc::clone(metrics),
    )?
    .with_dedicated_caps(config.upstream_caps);
    upstream.spawn_health_checks(config.health_check.as_ref());
    let mut tls = HashMap::new();
    for l in config.listeners.iter().filter(|l| !l.tls.is_empty()) {
        let acceptor = proxy::tls::acceptor(&l.tls, config.http2)
            .with_context(|| format!("TLS for listener {}", l.address))?;
        tls.insert(l.address, acceptor);
    }
    Ok(Live {
        upstream: Arc::new(upstream),
        trusted: TrustedSources::new(&config.trust.proxy),
        limits: config.limits,
        timeouts: config.timeouts,
        route_timeouts: Arc::new(config.route_timeouts.clone()),
        tls,
        access_log: config.access_log,
    })
}

/// SIGHUP or `POST /reload`: re-read the file; apply backends, trust list, limits, timeouts and
/// certificates to new connections. A file that does not validate changes nothing. Returns what
/// was applied, or why the file was refused (each logged and counted here).
async fn reload(
    args: &RunArgs,
    running: &mut Config,
    gateway: &Gateway,
    kernel: Option<&KernelTracker>,
    metrics: &Arc<Metrics>,
) -> ReloadOutcome {
    let refused = |what: &str, e: &anyhow::Error| {
        metrics.reload(ReloadResult::Failure);
        let reason = format!("{what}{e:#}");
        tracing::error!(error = %reason, "reload refused; the running configuration stays");
        reason
    };
    let new = Config::load_for_reload(args).map_err(|e| refused("", &e.into()))?;
    verify_bridging(&new).await.map_err(|e| refused("", &e))?;
    let live = build_live(&new, metrics).map_err(|e| refused("", &e))?;
    // The kernel first, all or nothing; userspace (PROXY trust and the rest) only once it took
    // the new lists, so neither ever trusts more than the configuration that is running.
    if let Some(k) = kernel {
        k.configure(&kernel_options(&new))
            .map_err(|e| refused("cannot update the kernel's trust lists: ", &e.into()))?;
    }
    log_warnings(&new);
    let restart_only = restart_only_changes(running, &new);
    for key in &restart_only {
        tracing::warn!(
            key,
            "changed in the file, but takes effect only after a restart"
        );
    }
    gateway.live.store(Arc::new(live));
    if new.lockout != running.lockout {
        warn_if_lockout_off(&new);
        gateway.lockout.reconfigure(new.lockout.clone());
    }
    metrics.reload(ReloadResult::Success);
    let backends: Vec<String> = new.backends.iter().map(ToString::to_string).collect();
    tracing::info!(
        ?backends,
        routes = ?new.routes.iter().map(|r| r.path_prefix.as_str()).collect::<Vec<_>>(),
        "configuration reloaded; established connections keep their settings (and routes)"
    );
    let mut summary = format!("backends {}", backends.join(", "));
    if !restart_only.is_empty() {
        summary.push_str(&format!(
            "; changed but applied only at the next restart: {}",
            restart_only.join(", ")
        ));
    }
    *running = new;
    Ok(summary)
}

/// Turning the lockout guard off weakens a default: say so at every start and reload.
fn warn_if_lockout_off(config: &Config) {
    if !config.lockout.enabled {
        tracing::warn!(
            "lockout.enabled = false: failed NTLM logins are not counted, and a client looping on \
             a wrong password reaches the domain controller until it locks the account"
        );
    }
}

/// Keys that a reload cannot apply.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old
        .listeners
        .iter()
        .map(|l| (l.address, l.proxy_protocol))
        .ne(new.listeners.iter().map(|l| (l.address, l.proxy_protocol)))
    {
        keys.push("listen");
    }
    if old.admin.as_ref().map(|a| &a.endpoint) != new.admin.as_ref().map(|a| &a.endpoint) {
        keys.push("admin");
    }
    if old.admin.as_ref().map(|a| &a.token_file) != new.admin.as_ref().map(|a| &a.token_file) {
        keys.push("admin_token_file");
    }
    if old.show_full_ids != new.show_full_ids {
        keys.push("show_full_ids");
    }
    if old.identity.header != new.identity.header {
        keys.push("header");
    }
    if old.identity.template.as_str() != new.identity.template.as_str() {
        keys.push("id_template");
    }
    if old.ebpf.mode != new.ebpf.mode || old.ebpf.map_entries != new.ebpf.map_entries {
        keys.push("ebpf");
    }
    if old.ebpf.xdp_interfaces != new.ebpf.xdp_interfaces {
        keys.push("xdp");
    }
    if old.http2 != new.http2 {
        keys.push("http2");
    }
    if old.user != new.user {
        keys.push("user");
    }
    keys
}

/// With XDP on, a subscription to address changes (made now, before any privilege drop), so that
/// the kernel's list of local addresses follows the host's.
fn watch_local_addresses(
    config: &Config,
    kernel: Option<&Arc<KernelTracker>>,
) -> Option<local_addrs::AddressWatch> {
    if config.ebpf.xdp_interfaces.is_empty() || kernel.is_none() {
        return None;
    }
    match local_addrs::AddressWatch::subscribe() {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot watch this host's address changes; after adding an address that tunnels \
                 carry traffic for, reload (SIGHUP) so that XDP decapsulates for it"
            );
            None
        }
    }
}

fn kernel_options(config: &Config) -> KernelOptions {
    KernelOptions {
        map_entries: config.ebpf.map_entries,
        toa_kind: config.ebpf.toa_kind,
        toa_trusted: config.trust.toa.clone(),
        ipip_trusted: config.trust.ipip.clone(),
        xdp_interfaces: config.ebpf.xdp_interfaces.clone(),
    }
}

/// Valid settings that weaken safety, each with its key.
fn log_warnings(config: &Config) {
    for w in &config.warnings {
        tracing::warn!(key = w.key, "{}", w.message);
    }
}

/// Loads the kernel programs as `config.ebpf.mode` asks. Returns the tracker and a status line.
fn start_kernel(
    config: &Config,
    join: Option<&std::path::Path>,
) -> Result<(Option<Arc<KernelTracker>>, String)> {
    match config.ebpf.mode {
        EbpfMode::Off => {
            tracing::info!(
                "eBPF off (--ebpf off): connection identities are the accepted peer addresses; ids still \
                 never repeat, but behind an L4 balancer the client shown is the balancer"
            );
            Ok((None, "off".to_string()))
        }
        mode => match KernelTracker::start(&kernel_options(config), join) {
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

enum Signal {
    Reload,
    Stop,
}

/// The stop and reload signals, installed once before the gateway says it is ready: a signal sent
/// right after the ready line must be handled, not kill the process by its default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            tokio::signal::unix::signal(kind)
                .with_context(|| format!("cannot install the {name} handler"))
        };
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Stop
            }
            _ = self.int.recv() => {
                tracing::info!("SIGINT received");
                Signal::Stop
            }
            _ = self.hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                Signal::Reload
            }
        }
    }
}

/// The worker threads for `workers` (0: one per CPU this process may run on, so a gateway
/// confined by `taskset`, a cpuset or a CPU quota gets as many workers as it has CPUs).
pub fn resolve_workers(workers: usize) -> usize {
    if workers != 0 {
        return workers;
    }
    // `available_parallelism` honours sched_getaffinity and cgroup CPU quotas on Linux.
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The runtime with `workers` threads (see `resolve_workers` for 0).
pub fn build_runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let workers = resolve_workers(workers);
    // One worker: a current-thread runtime. The multi-thread scheduler with a single worker still
    // pays for cross-thread wake-ups and work-stealing bookkeeping on every request (about twice
    // the CPU per keep-alive request on one core).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().thread_name("ntlm-tag");
    if workers > 1 {
        builder.worker_threads(workers);
    }
    match builder.build() {
        Ok(rt) => Ok(rt),
        Err(e) => bail!("cannot start the runtime: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread confined to CPU 0: what `taskset -c 0`, a one-CPU cpuset or container
    /// gives the whole process (`available_parallelism` reads the calling thread's affinity).
    fn on_one_cpu<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it; pid 0 is
                // the calling thread.
                let status = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_ZERO(&mut set);
                    libc::CPU_SET(0, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
                };
                assert_eq!(status, 0, "sched_setaffinity to CPU 0");
                f()
            })
            .join()
            .expect("the confined thread panicked")
        })
    }

    #[test]
    fn workers_zero_on_one_cpu_is_the_single_threaded_runtime() {
        assert_eq!(resolve_workers(3), 3);
        assert_eq!(on_one_cpu(|| resolve_workers(0)), 1);
        let flavor = on_one_cpu(|| build_runtime(0).expect("runtime").handle().runtime_flavor());
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
    }
}
