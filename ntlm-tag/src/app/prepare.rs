//! The privileged part of start-up, before the runtime exists: the kernel programs, the listening
//! sockets (bound, or taken over from a running gateway), the admin socket, and the user switch.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

use super::reload::log_warnings;
use crate::{
    admin::AdminListener,
    config::Config,
    descriptors,
    handover::{self, Predecessor, UpgradeSocket, XdpTaken},
    kernel::{
        self, EbpfMode, InheritedXdp, InheritedXdpLink, KernelTracker, local_addrs, privileges,
    },
    proxy::ListenerConfig,
    ready_deadline::{self, Step},
};

#[derive(Debug, thiserror::Error)]
#[error("--ebpf required, but the kernel programs are not running: {0}")]
pub struct EbpfRequiredError(String);

/// What start-up acquired while privileged: the kernel programs, the bound listeners, and the user
/// switch. Made by [`prepare`] before the async runtime exists.
pub struct Prepared {
    pub(super) kernel: Option<Arc<KernelTracker>>,
    pub(super) ebpf_status: String,
    pub(super) listeners: Vec<(std::net::TcpListener, Arc<ListenerConfig>)>,
    pub(super) admin_listener: Option<AdminListener>,
    pub(super) upgrade_socket: Option<UpgradeSocket>,
    /// With `ntlm-tag upgrade`: the running gateway, until it released its listeners to this one.
    pub(super) predecessor: Option<Predecessor>,
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
    raise_descriptor_limit(config.limits.max_connections);
    let (predecessor, mut inherited) = if upgrade {
        let path = config.upgrade_socket.as_deref().context(
            "`ntlm-tag upgrade` takes over through upgrade_socket, and the configuration sets none",
        )?;
        ready_deadline::entering(Step::Connecting);
        let (predecessor, inherited) = handover::take_over(path)?;
        ready_deadline::entering(Step::Kernel);
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
    // The running gateway's XDP links, for the interfaces this configuration names; refused here,
    // before anything is attached, when it cannot hand them over.
    let inherited_xdp = match inherited.as_mut() {
        Some(i) if config.ebpf.mode != EbpfMode::Off => i
            .take_xdp_links(&config.ebpf.xdp_interfaces)
            .map_err(|reason| anyhow::anyhow!("`ntlm-tag upgrade`: {reason}"))?,
        _ => (Vec::new(), None),
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
        Some(i) => start_kernel(config, i.cgroup.as_deref(), inherited_xdp)?,
        None => start_kernel(config, None, (Vec::new(), None))?,
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
    } else if kernel::running_as_root() {
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
pub(super) fn switch_user(
    user: &str,
    kernel: Option<&KernelTracker>,
    mode: EbpfMode,
) -> Result<bool> {
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

/// A listening socket as tokio would make it (SO_REUSEADDR, backlog 1024), made without a runtime.
pub(super) fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// With XDP on, a subscription to address changes (made now, before any privilege drop), so that
/// the kernel's list of local addresses follows the host's.
pub(super) fn watch_local_addresses(
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

/// Loads the kernel programs as `config.ebpf.mode` asks. Returns the tracker and a status line.
///
/// `xdp` is what the running gateway handed over (an upgrade): its links and its program.
pub(super) fn start_kernel(
    config: &Config,
    join: Option<&std::path::Path>,
    xdp: XdpTaken,
) -> Result<(Option<Arc<KernelTracker>>, String)> {
    match config.ebpf.mode {
        EbpfMode::Off => {
            tracing::info!(
                "eBPF off (--ebpf off): connection identities are the accepted peer addresses; ids still \
                 never repeat, but behind an L4 balancer the client shown is the balancer"
            );
            Ok((None, "off".to_string()))
        }
        mode => match KernelTracker::start(&config.kernel_options(), join, inherited_links(xdp)) {
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

fn inherited_links((links, program): XdpTaken) -> InheritedXdp {
    let links = links
        .into_iter()
        .map(|(interface, mode, link)| InheritedXdpLink {
            interface,
            mode,
            link,
        })
        .collect();
    InheritedXdp { links, program }
}

/// Raises the soft descriptor limit to the hard one (a client connection holds a descriptor, and
/// its upstream connection another), and warns when even that is below what `max_connections`
/// needs: past the limit, accepts fail (EMFILE) and new connections wait in the kernel's queue.
fn raise_descriptor_limit(max_connections: usize) {
    let limit = match descriptors::raise_to_hard_limit() {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE) to its hard limit");
            match descriptors::soft_limit() {
                Some(limit) => limit,
                None => return,
            }
        }
    };
    let needed = (max_connections as u64).saturating_mul(2);
    if limit < needed {
        tracing::warn!(
            descriptor_limit = limit,
            max_connections,
            "the descriptor limit is below two per allowed connection (client and upstream): \
             raise LimitNOFILE= in the systemd unit, or lower limits.max_connections"
        );
    } else {
        tracing::debug!(descriptor_limit = limit, "descriptor limit");
    }
}
