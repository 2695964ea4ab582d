//! The reloadable part of the configuration: built at start and on every reload (SIGHUP or
//! `POST /reload`), applied all or nothing, with the warnings an operator must see each time.
#![forbid(unsafe_code)]

use std::{collections::HashMap, sync::Arc};

use anyhow::{Context, Result};

use crate::{
    admin::ReloadOutcome,
    cli::RunArgs,
    config::Config,
    identity::trust::TrustedSources,
    kernel::KernelTracker,
    metrics::{Metrics, ReloadResult},
    proxy::{self, Gateway, Live},
    upstream::Upstream,
};

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
pub(super) fn build_live(config: &Config, metrics: &Arc<Metrics>) -> Result<Live> {
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
pub(super) async fn reload(
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
        k.configure(&new.kernel_options())
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
pub(super) fn warn_if_lockout_off(config: &Config) {
    if !config.lockout.enabled {
        tracing::warn!(
            "lockout.enabled = false: failed NTLM logins are not counted, and a client looping on \
             a wrong password reaches the domain controller until it locks the account"
        );
    }
}

/// Keys that a reload cannot apply.
pub(super) fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
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

/// Valid settings that weaken safety, each with its key.
pub(super) fn log_warnings(config: &Config) {
    for w in &config.warnings {
        tracing::warn!(key = w.key, "{}", w.message);
    }
}
