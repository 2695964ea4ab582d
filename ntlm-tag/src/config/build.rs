//! Flags merged over the file, defaults applied and every value checked: the one place that turns
//! the file and the command line into a [`Config`]. Each error names the offending key.
#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use http::HeaderName;

use crate::{
    admin::{AdminConfig, AdminEndpoint, AdminToken},
    cli::{LogFormat, RunArgs},
    guard::LockoutConfig,
    identity::{
        DEFAULT_HEADER, IdentityConfig,
        conn_id::{DEFAULT_TEMPLATE, IdTemplate},
    },
    kernel::{EbpfConfig, EbpfMode},
    proxy::{
        Limits, ListenerConfig,
        rewrite::is_reserved_header,
        route_timeouts::{RouteTimeout, RouteTimeouts},
        tls::TlsCertConfig,
    },
    upstream::{Balance, Mode, Timeouts},
};

use super::{
    Config, ConfigError, Secrets,
    backends::{
        all_backends, build_health_check, build_routes, build_upstream_caps, parse_backend_entry,
    },
    file::*,
    trust::{TrustInput, build_trust, pick_list},
};

impl Config {
    pub(super) fn build(
        file: FileConfig,
        args: &RunArgs,
        secrets: Secrets,
    ) -> Result<Self, ConfigError> {
        if args.tls_cert.len() != args.tls_key.len() {
            return Err(ConfigError::invalid(
                "tls",
                "give --tls-cert and --tls-key in pairs",
            ));
        }
        let cli_tls: Vec<TlsCertConfig> = args
            .tls_cert
            .iter()
            .zip(&args.tls_key)
            .map(|(cert, key)| TlsCertConfig {
                cert: cert.clone(),
                key: key.clone(),
            })
            .collect();
        let listeners: Vec<ListenerConfig> = if !args.listen.is_empty() {
            args.listen
                .iter()
                .map(|&address| ListenerConfig {
                    address,
                    proxy_protocol: args.proxy_protocol,
                    tls: cli_tls.clone(),
                })
                .collect()
        } else {
            file.listen
                .unwrap_or_default()
                .into_iter()
                .map(|e| match e {
                    ListenEntry::Address(address) => ListenerConfig {
                        address,
                        proxy_protocol: args.proxy_protocol,
                        tls: cli_tls.clone(),
                    },
                    ListenEntry::Table(t) => t,
                })
                .collect()
        };
        if listeners.is_empty() {
            return Err(ConfigError::invalid(
                "listen",
                "no listener: give --listen ADDR or `listen = [\"0.0.0.0:80\"]`",
            ));
        }
        for (i, l) in listeners.iter().enumerate() {
            if listeners[..i].iter().any(|o| o.address == l.address) {
                return Err(ConfigError::invalid(
                    "listen",
                    format!("{} is listed twice", l.address),
                ));
            }
        }

        let backend_entries: Vec<BackendEntry> = if !args.backends.is_empty() {
            args.backends
                .iter()
                .cloned()
                .map(BackendEntry::Address)
                .collect()
        } else {
            file.backends.unwrap_or_default()
        };
        if backend_entries.is_empty() {
            return Err(ConfigError::invalid(
                "backends",
                "no backend: give --backend HOST:PORT or `backends = [\"10.0.0.5:8080\"]`",
            ));
        }
        let backends = backend_entries
            .iter()
            .map(parse_backend_entry)
            .collect::<Result<Vec<_>, _>>()?;
        let routes = build_routes(file.route.unwrap_or_default(), &backends)?;
        let epa_bridging = file.epa_bridging.unwrap_or(false);
        if epa_bridging
            && let Some(why) =
                crate::epa::bridging::unbridgeable(&listeners, &all_backends(&backends, &routes))
        {
            return Err(ConfigError::invalid("epa_bridging", why));
        }

        let header_text = args
            .header
            .clone()
            .or(file.header)
            .unwrap_or_else(|| DEFAULT_HEADER.to_string());
        let header = HeaderName::from_bytes(header_text.as_bytes()).map_err(|_| {
            ConfigError::invalid(
                "header",
                format!("{header_text:?} is not a valid HTTP header name"),
            )
        })?;
        if is_reserved_header(&header) {
            return Err(ConfigError::invalid(
                "header",
                format!(
                    "{header} is a standard or hop-by-hop header and cannot carry the connection id"
                ),
            ));
        }

        let allow_reusable_ids = file.allow_reusable_ids.unwrap_or(false);
        let template_text = args
            .id_template
            .clone()
            .or(file.id_template)
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        let template = IdTemplate::parse(&template_text, allow_reusable_ids)
            .map_err(|e| ConfigError::invalid("id_template", e.to_string()))?;
        if template.uses_proxy_tlvs() && !listeners.iter().any(|l| l.proxy_protocol) {
            return Err(ConfigError::invalid(
                "id_template",
                format!(
                    "{template_text:?} names PROXY v2 TLVs, but no listener reads PROXY headers \
                     (proxy_protocol = true): every id would say `-` there"
                ),
            ));
        }

        let map_entries = args
            .map_entries
            .or(file.map_entries)
            .unwrap_or(ntlm_tag_common::CONN_IDENTITY_DEFAULT_ENTRIES);
        if map_entries == 0 {
            return Err(ConfigError::invalid("map_entries", "must be at least 1"));
        }

        let mut timeouts_file = file.timeouts.unwrap_or_default();
        let route_timeouts = build_route_timeouts(timeouts_file.route.take().unwrap_or_default())?;
        let timeouts = build_timeouts(timeouts_file)?;
        let upstream_caps = build_upstream_caps(file.upstream_caps.unwrap_or_default())?;

        let xdp_interfaces = if !args.xdp_interfaces.is_empty() {
            args.xdp_interfaces.clone()
        } else {
            file.xdp.unwrap_or_default()
        };
        if let Some(bad) = xdp_interfaces
            .iter()
            .find(|i| i.is_empty() || i.len() > 15 || i.contains(['/', ' ']))
        {
            return Err(ConfigError::invalid(
                "xdp",
                format!("{bad:?} is not an interface name"),
            ));
        }
        let toa_kind = args.toa_kind.or(file.toa_kind).unwrap_or(0);
        if matches!(toa_kind, 1 | 2 | 3 | 4 | 5 | 8) {
            return Err(ConfigError::invalid(
                "toa_kind",
                format!(
                    "{toa_kind} is a standard TCP option (NOP/MSS/WS/SACK/timestamps), not TOA"
                ),
            ));
        }
        let (trust, warnings) = build_trust(
            TrustInput {
                proxy: pick_list(&args.trusted_lbs, file.trusted_lbs),
                toa: pick_list(&args.toa_trusted_lbs, file.toa_trusted_lbs),
                ipip: pick_list(&args.ipip_trusted_lbs, file.ipip_trusted_lbs),
            },
            toa_kind,
            !xdp_interfaces.is_empty(),
        )?;
        if let Some(l) = listeners.iter().find(|l| l.proxy_protocol)
            && trust.proxy.is_empty()
        {
            return Err(ConfigError::invalid(
                "trusted_lbs",
                format!(
                    "listener {} expects PROXY protocol, but no balancer is trusted to send it; add \
                     --trusted-lb CIDR (or `trusted_lbs = [...]`)",
                    l.address
                ),
            ));
        }

        let health_check = build_health_check(args.health_check.clone(), file.health_check)?;
        let mut limits_file = file.limits.unwrap_or_default();
        if let Some(n) = args.max_upstream_per_backend {
            limits_file.max_upstream_per_backend = Some(n);
        }
        let limits = build_limits(limits_file)?;
        let lockout = build_lockout(file.lockout.unwrap_or_default())?;
        if let Some(user) = args.user.as_ref().or(file.user.as_ref())
            && (user.is_empty() || user.contains(['/', ':', ' ']))
        {
            return Err(ConfigError::invalid(
                "user",
                format!("{user:?} is not a user name"),
            ));
        }

        let admin = build_admin(
            args.admin.clone().or(file.admin),
            args.admin_token_file.clone().or(file.admin_token_file),
            secrets,
        )?;

        Ok(Config {
            listeners,
            backends,
            routes,
            epa_bridging,
            mode: args.mode.or(file.mode).unwrap_or(Mode::Bind),
            balance: args.balance.or(file.balance).unwrap_or(Balance::LeastConn),
            health_check,
            http2: args.http2 || file.http2.unwrap_or(false),
            limits,
            user: args.user.clone().or(file.user),
            access_log: file.access_log.unwrap_or(true),
            identity: IdentityConfig {
                header,
                template,
                forwarded_headers: file.forwarded_headers.unwrap_or(true),
            },
            trust,
            ebpf: EbpfConfig {
                mode: args.ebpf.or(file.ebpf).unwrap_or(EbpfMode::Auto),
                map_entries,
                toa_kind,
                xdp_interfaces,
            },
            admin,
            show_full_ids: args.show_full_ids || file.show_full_ids.unwrap_or(false),
            upgrade_socket: build_upgrade_socket(
                args.upgrade_socket.clone().or(file.upgrade_socket),
            )?,
            workers: args.workers.or(file.workers).unwrap_or(0),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            timeouts,
            route_timeouts,
            upstream_caps,
            warnings,
            lockout,
        })
    }
}

pub(super) fn build_admin(
    endpoint: Option<String>,
    token_file: Option<PathBuf>,
    secrets: Secrets,
) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(text) = endpoint else {
        return match token_file {
            None => Ok(None),
            Some(_) => Err(ConfigError::invalid(
                "admin_token_file",
                "set, but there is no admin endpoint (`admin = \"HOST:PORT\"`)",
            )),
        };
    };
    let endpoint: AdminEndpoint = text
        .parse()
        .map_err(|message: String| ConfigError::invalid("admin", message))?;
    let token = match (&endpoint, &token_file) {
        (_, None) => None,
        (AdminEndpoint::Unix(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "admin_token_file",
                "a unix: admin socket is protected by its file mode and takes no token; drop \
                 admin_token_file, or use a HOST:PORT admin address",
            ));
        }
        (AdminEndpoint::Tcp(_), Some(_)) if secrets == Secrets::Skip => None,
        (AdminEndpoint::Tcp(_), Some(path)) => Some(
            AdminToken::from_file(path)
                .map_err(|e| ConfigError::invalid("admin_token_file", e.to_string()))?,
        ),
    };
    Ok(Some(AdminConfig {
        endpoint,
        token_file,
        token,
    }))
}

pub(super) fn build_limits(file: LimitsFile) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let max_connections = file.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        return Err(ConfigError::invalid(
            "limits.max_connections",
            "must be at least 1",
        ));
    }
    let max_header_bytes = file.max_header_bytes.unwrap_or(d.max_header_bytes);
    if !(8192..=1 << 20).contains(&max_header_bytes) {
        return Err(ConfigError::invalid(
            "limits.max_header_bytes",
            format!("{max_header_bytes} is outside 8192..=1048576"),
        ));
    }
    Ok(Limits {
        max_connections,
        max_header_bytes,
        max_upstream_per_backend: file
            .max_upstream_per_backend
            .unwrap_or(d.max_upstream_per_backend),
    })
}

pub(super) fn build_lockout(file: LockoutFile) -> Result<LockoutConfig, ConfigError> {
    let d = LockoutConfig::default();
    let max_failures = file.max_failures.unwrap_or(d.max_failures);
    if max_failures == 0 {
        return Err(ConfigError::invalid(
            "lockout.max_failures",
            "must be at least 1 (0 would refuse every login; `enabled = false` turns the guard off)",
        ));
    }
    let window = match file.window_secs {
        None => d.window,
        Some(s) if (1.0..=7.0 * 86_400.0).contains(&s) => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(ConfigError::invalid(
                "lockout.window_secs",
                format!("{s} is not a number of seconds between 1 and 604800 (7 days)"),
            ));
        }
    };
    let max_tracked = file.max_tracked.unwrap_or(d.max_tracked);
    if !(1..=10_000_000).contains(&max_tracked) {
        return Err(ConfigError::invalid(
            "lockout.max_tracked",
            format!("{max_tracked} is not between 1 and 10000000"),
        ));
    }
    Ok(LockoutConfig {
        enabled: file.enabled.unwrap_or(d.enabled),
        max_failures,
        max_failures_per_address: file
            .max_failures_per_address
            .unwrap_or(d.max_failures_per_address),
        max_failures_per_user: file
            .max_failures_per_user
            .unwrap_or(d.max_failures_per_user),
        window,
        allow: file.allow.unwrap_or_default(),
        max_tracked,
    })
}

pub(super) fn build_route_timeouts(
    routes: Vec<RouteTimeoutFile>,
) -> Result<RouteTimeouts, ConfigError> {
    let routes = routes
        .into_iter()
        .map(|r| match r.response_secs {
            s if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(RouteTimeout {
                path_prefix: r.path_prefix,
                response: Duration::from_secs_f64(s),
            }),
            s => Err(ConfigError::invalid(
                "timeouts.route.response_secs",
                format!(
                    "{s} (for {:?}) is not a number of seconds between 0 and 86400",
                    r.path_prefix
                ),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RouteTimeouts::new(routes)
        .map_err(|e| ConfigError::invalid("timeouts.route.path_prefix", e.to_string()))
}

pub(super) fn build_timeouts(file: TimeoutsFile) -> Result<Timeouts, ConfigError> {
    let d = Timeouts::default();
    let pick = |key: &'static str, v: Option<f64>, default: Duration| match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s < 86_400.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(ConfigError::invalid(
            key,
            format!("{s} is not a number of seconds between 0 and 86400"),
        )),
    };
    Ok(Timeouts {
        upstream_connect: pick(
            "timeouts.upstream_connect_secs",
            file.upstream_connect_secs,
            d.upstream_connect,
        )?,
        upstream_response: pick(
            "timeouts.upstream_response_secs",
            file.upstream_response_secs,
            d.upstream_response,
        )?,
        upstream_idle: pick(
            "timeouts.upstream_idle_secs",
            file.upstream_idle_secs,
            d.upstream_idle,
        )?,
        header_read: pick(
            "timeouts.header_read_secs",
            file.header_read_secs,
            d.header_read,
        )?,
        idle: pick("timeouts.idle_secs", file.idle_secs, d.idle)?,
        drain: pick("timeouts.drain_secs", file.drain_secs, d.drain)?,
        upgrade_drain: pick(
            "timeouts.upgrade_drain_secs",
            file.upgrade_drain_secs,
            d.upgrade_drain,
        )?,
        proxy_header: pick(
            "timeouts.proxy_header_secs",
            file.proxy_header_secs,
            d.proxy_header,
        )?,
    })
}

/// `upgrade_socket`: an absolute path (it is handed from one process to the next, whatever their
/// working directories).
pub(super) fn build_upgrade_socket(path: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(p) if !p.is_absolute() || p.file_name().is_none() => Err(ConfigError::invalid(
            "upgrade_socket",
            format!("{} is not an absolute path to a socket file", p.display()),
        )),
        other => Ok(other),
    }
}
