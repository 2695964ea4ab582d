//! Configuration: the TOML file, with command-line flags merged over it, validated once at start-up.
//! Every error names the offending key so that `ntlm-tag check` and start-up can say exactly what to fix.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use http::{HeaderName, uri::Authority};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    admin::{AdminConfig, AdminEndpoint, AdminToken},
    cli::{LogFormat, RunArgs},
    guard::LockoutConfig,
    identity::{
        DEFAULT_HEADER, IdentityConfig,
        conn_id::{DEFAULT_TEMPLATE, IdTemplate},
        trust::{TrustLists, covers_a_whole_family, normalise},
    },
    kernel::{EbpfConfig, EbpfMode},
    proxy::{
        Limits, ListenerConfig,
        rewrite::is_reserved_header,
        route_timeouts::{RouteTimeout, RouteTimeouts},
        tls::TlsCertConfig,
    },
    upstream::{
        BackendAddress, Balance, DedicatedCaps, HealthCheckConfig, Mode, RouteConfig, Timeouts,
        tls::BackendTlsConfig,
    },
};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            message: message.into(),
        }
    }
}

/// A listener as written in the file: an address, or a table with per-listener settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ListenEntry {
    Address(SocketAddr),
    Table(ListenerConfig),
}

/// A backend as written in the file: an address (`HOST:PORT` plain HTTP, `https://HOST[:PORT]`
/// TLS), or a table with TLS settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum BackendEntry {
    Address(String),
    Table(BackendTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTable {
    address: String,
    tls_server_name: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// The file's keys. Every key is optional; defaults are applied in [`Config::build`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<ListenEntry>>,
    trusted_lbs: Option<Vec<ipnet::IpNet>>,
    toa_kind: Option<u8>,
    toa_trusted_lbs: Option<Vec<ipnet::IpNet>>,
    ipip_trusted_lbs: Option<Vec<ipnet::IpNet>>,
    xdp: Option<Vec<String>>,
    backends: Option<Vec<BackendEntry>>,
    route: Option<Vec<RouteFile>>,
    epa_bridging: Option<bool>,
    mode: Option<Mode>,
    balance: Option<Balance>,
    health_check: Option<HealthCheckFile>,
    http2: Option<bool>,
    user: Option<String>,
    access_log: Option<bool>,
    limits: Option<LimitsFile>,
    header: Option<String>,
    id_template: Option<String>,
    allow_reusable_ids: Option<bool>,
    forwarded_headers: Option<bool>,
    ebpf: Option<EbpfMode>,
    map_entries: Option<u32>,
    admin: Option<String>,
    admin_token_file: Option<PathBuf>,
    show_full_ids: Option<bool>,
    upgrade_socket: Option<PathBuf>,
    workers: Option<usize>,
    log_format: Option<LogFormat>,
    timeouts: Option<TimeoutsFile>,
    lockout: Option<LockoutFile>,
    upstream_caps: Option<UpstreamCapsFile>,
}

/// `[upstream_caps]`: see [`DedicatedCaps`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamCapsFile {
    max_age_secs: Option<f64>,
    max_requests: Option<u64>,
}

/// `[lockout]`: see [`LockoutConfig`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockoutFile {
    enabled: Option<bool>,
    max_failures: Option<u32>,
    max_failures_per_address: Option<u32>,
    max_failures_per_user: Option<u32>,
    window_secs: Option<f64>,
    allow: Option<Vec<ipnet::IpNet>>,
    max_tracked: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_connections: Option<usize>,
    max_header_bytes: Option<usize>,
    max_upstream_per_backend: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckFile {
    path: Option<String>,
    interval_secs: Option<f64>,
    timeout_secs: Option<f64>,
    expect_status: Option<u16>,
}

/// `[[route]]` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    path_prefix: String,
    backends: Vec<BackendEntry>,
    health_check: Option<HealthCheckFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    upstream_connect_secs: Option<f64>,
    upstream_response_secs: Option<f64>,
    upstream_idle_secs: Option<f64>,
    header_read_secs: Option<f64>,
    idle_secs: Option<f64>,
    drain_secs: Option<f64>,
    upgrade_drain_secs: Option<f64>,
    proxy_header_secs: Option<f64>,
    route: Option<Vec<RouteTimeoutFile>>,
}

/// One `[[timeouts.route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTimeoutFile {
    path_prefix: String,
    response_secs: f64,
}

/// Whether building the configuration reads the admin token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets {
    Read,
    /// On SIGHUP: the gateway may have switched to a user that cannot read the file (it is 0600,
    /// usually root's), and the admin endpoint keeps the token it started with anyway.
    Skip,
}

/// The validated, effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    /// The default pool: every request no route matches.
    pub backends: Vec<BackendAddress>,
    /// Path prefixes with pools of their own (longest prefix wins).
    pub routes: Vec<RouteConfig>,
    /// Check that every TLS backend presents the listeners' certificate (Extended Protection
    /// through the gateway); every backend must be https:// and a listener must terminate TLS.
    pub epa_bridging: bool,
    pub mode: Mode,
    pub balance: Balance,
    pub health_check: Option<HealthCheckConfig>,
    /// Accept HTTP/2 from clients.
    pub http2: bool,
    pub limits: Limits,
    /// Run as this user after start-up (None: stay as started).
    pub user: Option<String>,
    /// An access log line per request (target `access`).
    pub access_log: bool,
    pub identity: IdentityConfig,
    /// Balancer prefixes allowed to convey client identity, per mechanism.
    pub trust: TrustLists,
    pub ebpf: EbpfConfig,
    pub admin: Option<AdminConfig>,
    /// Show full connection ids in logs and the admin table (else keyed hashes).
    pub show_full_ids: bool,
    /// The unix socket a successor connects to in order to take over the listeners (none: upgrades
    /// are off).
    pub upgrade_socket: Option<PathBuf>,
    pub workers: usize,
    pub log_format: LogFormat,
    pub timeouts: Timeouts,
    /// `[[timeouts.route]]`: response timeouts of path prefixes that answer late by design.
    pub route_timeouts: RouteTimeouts,
    /// `[upstream_caps]`: age and request caps on bound and pinned upstream connections.
    pub upstream_caps: DedicatedCaps,
    pub lockout: LockoutConfig,
    /// Valid but risky settings, logged at start-up and on reload (and printed by `check`).
    pub warnings: Vec<ConfigWarning>,
}

/// A setting that is allowed but weakens safety; the message says what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

impl Config {
    /// Every backend of the default pool and the routes, each once.
    pub fn all_backends(&self) -> Vec<BackendAddress> {
        all_backends(&self.backends, &self.routes)
    }

    /// Reads the file named by `--config` (if any) and merges the flags over it.
    pub fn load(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::build(file, args, Secrets::Read)
    }

    /// Like [`load`](Self::load), for a reload: the admin token file is not read again (the admin
    /// endpoint and its token change only with a restart).
    pub fn load_for_reload(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::build(file, args, Secrets::Skip)
    }

    /// Parses a TOML document and merges `args` over it (no file access).
    #[cfg(test)]
    pub fn from_toml(text: &str, args: &RunArgs) -> Result<Self, ConfigError> {
        let file = parse_file(text, Path::new("<config>"))?;
        Self::build(file, args, Secrets::Read)
    }

    fn build(file: FileConfig, args: &RunArgs, secrets: Secrets) -> Result<Self, ConfigError> {
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

    /// The effective configuration as TOML, for `ntlm-tag check`.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct EffectiveBackend<'a> {
            address: String,
            #[serde(flatten, skip_serializing_if = "Option::is_none")]
            tls: Option<&'a BackendTlsConfig>,
        }
        fn effective_backend(b: &BackendAddress) -> EffectiveBackend<'_> {
            EffectiveBackend {
                address: b.to_string(),
                tls: b.tls.as_ref(),
            }
        }
        #[derive(Serialize)]
        struct EffectiveTimeouts<'a> {
            #[serde(flatten)]
            base: Timeouts,
            #[serde(skip_serializing_if = "RouteTimeouts::is_empty")]
            route: &'a RouteTimeouts,
        }
        #[derive(Serialize)]
        struct EffectiveRoute<'a> {
            path_prefix: &'a str,
            backends: Vec<EffectiveBackend<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            health_check: Option<&'a HealthCheckConfig>,
        }
        #[derive(Serialize)]
        struct Effective<'a> {
            listen: &'a [ListenerConfig],
            mode: Mode,
            balance: Balance,
            http2: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            user: Option<&'a str>,
            access_log: bool,
            limits: Limits,
            #[serde(skip_serializing_if = "Option::is_none")]
            health_check: Option<&'a HealthCheckConfig>,
            trusted_lbs: &'a [ipnet::IpNet],
            toa_kind: u8,
            // The effective lists after the fallback to trusted_lbs; absent while the mechanism
            // is off (so that the output is itself a valid configuration).
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            toa_trusted_lbs: &'a [ipnet::IpNet],
            xdp: &'a [String],
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            ipip_trusted_lbs: &'a [ipnet::IpNet],
            backends: Vec<EffectiveBackend<'a>>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            route: Vec<EffectiveRoute<'a>>,
            epa_bridging: bool,
            header: &'a str,
            id_template: &'a str,
            allow_reusable_ids: bool,
            forwarded_headers: bool,
            ebpf: EbpfMode,
            map_entries: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            admin: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            admin_token_file: Option<&'a Path>,
            show_full_ids: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            upgrade_socket: Option<&'a Path>,
            workers: usize,
            log_format: LogFormat,
            timeouts: EffectiveTimeouts<'a>,
            lockout: &'a LockoutConfig,
            upstream_caps: DedicatedCaps,
        }
        let effective = Effective {
            listen: &self.listeners,
            mode: self.mode,
            balance: self.balance,
            http2: self.http2,
            user: self.user.as_deref(),
            access_log: self.access_log,
            limits: self.limits,
            health_check: self.health_check.as_ref(),
            trusted_lbs: &self.trust.proxy,
            toa_kind: self.ebpf.toa_kind,
            toa_trusted_lbs: &self.trust.toa,
            xdp: &self.ebpf.xdp_interfaces,
            ipip_trusted_lbs: &self.trust.ipip,
            backends: self.backends.iter().map(effective_backend).collect(),
            route: self
                .routes
                .iter()
                .map(|r| EffectiveRoute {
                    path_prefix: &r.path_prefix,
                    backends: r.backends.iter().map(effective_backend).collect(),
                    health_check: r.health_check.as_ref(),
                })
                .collect(),
            epa_bridging: self.epa_bridging,
            header: self.identity.header.as_str(),
            id_template: self.identity.template.as_str(),
            allow_reusable_ids: self.identity.template.is_reusable(),
            forwarded_headers: self.identity.forwarded_headers,
            ebpf: self.ebpf.mode,
            map_entries: self.ebpf.map_entries,
            admin: self.admin.as_ref().map(|a| a.endpoint.to_string()),
            admin_token_file: self.admin.as_ref().and_then(|a| a.token_file.as_deref()),
            show_full_ids: self.show_full_ids,
            upgrade_socket: self.upgrade_socket.as_deref(),
            workers: self.workers,
            log_format: self.log_format,
            timeouts: EffectiveTimeouts {
                base: self.timeouts,
                route: &self.route_timeouts,
            },
            lockout: &self.lockout,
            upstream_caps: self.upstream_caps,
        };
        toml::to_string_pretty(&effective).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn build_admin(
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

/// The trust lists as given (flags, else file), before normalisation and fallback.
struct TrustInput {
    proxy: Vec<ipnet::IpNet>,
    toa: Vec<ipnet::IpNet>,
    ipip: Vec<ipnet::IpNet>,
}

/// Flags replace the file's list.
fn pick_list(flags: &[ipnet::IpNet], file: Option<Vec<ipnet::IpNet>>) -> Vec<ipnet::IpNet> {
    if flags.is_empty() {
        file.unwrap_or_default()
    } else {
        flags.to_vec()
    }
}

/// One list per mechanism: `trusted_lbs` is PROXY protocol's, and the list TOA and IPIP fall back
/// to when they have none of their own. TOA is on only with a `toa_kind`, IPIP only with `xdp`
/// interfaces; a list for a mechanism that is off is refused (it would suggest trust that is not
/// there), and so is a mechanism that is on with nobody to trust.
fn build_trust(
    input: TrustInput,
    toa_kind: u8,
    xdp_on: bool,
) -> Result<(TrustLists, Vec<ConfigWarning>), ConfigError> {
    let normalised = |list: Vec<ipnet::IpNet>| -> Vec<ipnet::IpNet> {
        let mut out: Vec<ipnet::IpNet> = Vec::with_capacity(list.len());
        for net in list.into_iter().map(normalise) {
            if !out.contains(&net) {
                out.push(net);
            }
        }
        out
    };
    let proxy = normalised(input.proxy);
    let own_toa = normalised(input.toa);
    let own_ipip = normalised(input.ipip);
    let mut warnings = Vec::new();
    let mut uses_of_proxy_list = vec!["PROXY protocol"];
    let (toa_has_own, ipip_has_own) = (!own_toa.is_empty(), !own_ipip.is_empty());

    let toa = match (toa_kind, own_toa.is_empty()) {
        (0, true) => Vec::new(),
        (0, false) => {
            return Err(ConfigError::invalid(
                "toa_trusted_lbs",
                "TOA is off, so no balancer can be trusted for it; set toa_kind (--toa-kind, \
                 254 for LVS FULLNAT / DPVS) to turn it on, or remove the list",
            ));
        }
        (_, false) => own_toa,
        (kind, true) if proxy.is_empty() => {
            return Err(ConfigError::invalid(
                "toa_trusted_lbs",
                format!(
                    "toa_kind {kind} turns TOA on, but no balancer is trusted to send it; add \
                     --toa-trusted-lb CIDR (or `toa_trusted_lbs`, or `trusted_lbs`, which TOA falls \
                     back to)"
                ),
            ));
        }
        (_, true) => {
            uses_of_proxy_list.push("TOA");
            proxy.clone()
        }
    };
    let ipip = match (xdp_on, own_ipip.is_empty()) {
        (false, true) => Vec::new(),
        (false, false) => {
            return Err(ConfigError::invalid(
                "ipip_trusted_lbs",
                "no XDP interface is configured, so no tunnel is decapsulated; add --xdp IFACE \
                 (or `xdp = [...]`) to turn IPIP on, or remove the list",
            ));
        }
        (true, false) => own_ipip,
        (true, true) if proxy.is_empty() => {
            return Err(ConfigError::invalid(
                "ipip_trusted_lbs",
                "XDP decapsulation only accepts tunnels from trusted balancers; add \
                 --ipip-trusted-lb CIDR (or `ipip_trusted_lbs`, or `trusted_lbs`, which IPIP falls \
                 back to)",
            ));
        }
        (true, true) => {
            uses_of_proxy_list.push("IPIP");
            proxy.clone()
        }
    };

    let too_many = [("toa_trusted_lbs", &toa), ("ipip_trusted_lbs", &ipip)];
    for (key, list) in too_many {
        if list.len() > ntlm_tag_common::TRUSTED_PREFIX_ENTRIES as usize {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{} prefixes; at most {} fit the kernel's table",
                    list.len(),
                    ntlm_tag_common::TRUSTED_PREFIX_ENTRIES
                ),
            ));
        }
    }

    let own_lists: [(&'static str, &[ipnet::IpNet], String); 3] = [
        ("trusted_lbs", &proxy, uses_of_proxy_list.join(", ")),
        (
            "toa_trusted_lbs",
            if toa_has_own { &toa } else { &[] },
            "TOA".to_string(),
        ),
        (
            "ipip_trusted_lbs",
            if ipip_has_own { &ipip } else { &[] },
            "IPIP".to_string(),
        ),
    ];
    for (key, list, uses) in own_lists {
        for net in list {
            if let Some(what) = covers_a_whole_family(net) {
                warnings.push(ConfigWarning {
                    key,
                    message: format!(
                        "{net} covers {what}: any such peer may name the client ({uses}) and \
                         choose the address and id the backend sees; list your balancers' \
                         addresses instead"
                    ),
                });
            }
        }
    }
    Ok((TrustLists { proxy, toa, ipip }, warnings))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text, path)
}

fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

fn parse_backend_entry(entry: &BackendEntry) -> Result<BackendAddress, ConfigError> {
    let table = match entry {
        BackendEntry::Address(text) => {
            let (authority, https) = parse_backend(text)?;
            return Ok(BackendAddress {
                authority,
                tls: https.then(BackendTlsConfig::default),
            });
        }
        BackendEntry::Table(table) => table,
    };
    let (authority, https) = parse_backend(&table.address)?;
    let tls = BackendTlsConfig {
        tls_server_name: table.tls_server_name.clone(),
        ca_file: table.ca_file.clone(),
        client_cert: table.client_cert.clone(),
        client_key: table.client_key.clone(),
    };
    if !https {
        if tls != BackendTlsConfig::default() {
            return Err(ConfigError::invalid(
                "backends",
                format!(
                    "{:?} is plain HTTP, but TLS settings are given; write https://{}",
                    table.address, authority
                ),
            ));
        }
        return Ok(BackendAddress::plain(authority));
    }
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(ConfigError::invalid(
            "backends",
            format!(
                "{:?}: client_cert and client_key go together",
                table.address
            ),
        ));
    }
    if let Some(name) = &tls.tls_server_name
        && tokio_rustls::rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        return Err(ConfigError::invalid(
            "backends",
            format!("tls_server_name {name:?} is not a DNS name or an IP address"),
        ));
    }
    Ok(BackendAddress {
        authority,
        tls: Some(tls),
    })
}

/// `HOST:PORT` (plain HTTP; `http://` may be written), or `https://HOST[:PORT]` (TLS, port 443 by
/// default). Returns the authority and whether it is TLS.
fn parse_backend(text: &str) -> Result<(Authority, bool), ConfigError> {
    let (rest, https) = if let Some(rest) = text.strip_prefix("https://") {
        (rest, true)
    } else if let Some(rest) = text.strip_prefix("http://") {
        (rest, false)
    } else if text.contains("://") {
        return Err(ConfigError::invalid(
            "backends",
            format!("{text:?}: a backend is HOST:PORT, http://HOST:PORT or https://HOST[:PORT]"),
        ));
    } else {
        (text, false)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if text.contains('@') {
        return Err(ConfigError::invalid(
            "backends",
            format!("{text:?}: credentials are not allowed in a backend address"),
        ));
    }
    let mut authority: Authority = rest
        .parse()
        .map_err(|_| ConfigError::invalid("backends", format!("{text:?} is not HOST:PORT")))?;
    if authority.port_u16().is_none() {
        if !https {
            return Err(ConfigError::invalid(
                "backends",
                format!("{text:?} has no port (write HOST:PORT)"),
            ));
        }
        authority = format!("{rest}:443")
            .parse()
            .map_err(|_| ConfigError::invalid("backends", format!("{text:?} is not a host")))?;
    }
    Ok((authority, https))
}

fn build_limits(file: LimitsFile) -> Result<Limits, ConfigError> {
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

fn build_health_check(
    flag_path: Option<String>,
    file: Option<HealthCheckFile>,
) -> Result<Option<HealthCheckConfig>, ConfigError> {
    let file = match (flag_path, file) {
        (None, None) => return Ok(None),
        (Some(path), f) => HealthCheckFile {
            path: Some(path),
            ..f.unwrap_or_default()
        },
        (None, Some(f)) => f,
    };
    let path = file.path.unwrap_or_else(|| "/".to_string());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid(
            "health_check.path",
            format!("{path:?} is not an absolute request path"),
        ));
    }
    let secs = |key: &'static str, v: Option<f64>, default: f64| match v.unwrap_or(default) {
        s if s.is_finite() && s > 0.0 && s < 3600.0 => Ok(Duration::from_secs_f64(s)),
        s => Err(ConfigError::invalid(
            key,
            format!("{s} is not a number of seconds between 0 and 3600"),
        )),
    };
    let expect_status = file.expect_status.unwrap_or(200);
    if !(100..=599).contains(&expect_status) {
        return Err(ConfigError::invalid(
            "health_check.expect_status",
            format!("{expect_status} is not an HTTP status"),
        ));
    }
    Ok(Some(HealthCheckConfig {
        path,
        interval: secs("health_check.interval_secs", file.interval_secs, 2.0)?,
        timeout: secs("health_check.timeout_secs", file.timeout_secs, 1.0)?,
        expect_status,
    }))
}

/// Every backend of the default pool and the routes, each once, in the order first named.
fn all_backends(default: &[BackendAddress], routes: &[RouteConfig]) -> Vec<BackendAddress> {
    let mut all: Vec<BackendAddress> = Vec::new();
    for b in default
        .iter()
        .chain(routes.iter().flat_map(|r| &r.backends))
    {
        if !all.contains(b) {
            all.push(b.clone());
        }
    }
    all
}

/// `[[route]]`: each prefix an absolute path of whole segments, named once (case-insensitively,
/// as IIS names virtual directories); a backend named in two places must be the same backend
/// (same TLS settings), since the gateway keeps one set of connections per backend.
fn build_routes(
    files: Vec<RouteFile>,
    default: &[BackendAddress],
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(files.len());
    for file in files {
        let text = file.path_prefix;
        let prefix = text.strip_suffix('/').unwrap_or(&text);
        if prefix.is_empty() {
            return Err(ConfigError::invalid(
                "route.path_prefix",
                format!(
                    "{text:?} would take every request: the top-level `backends` are the pool for \
                     everything no route matches"
                ),
            ));
        }
        if !prefix.starts_with('/')
            || prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '%'))
        {
            return Err(ConfigError::invalid(
                "route.path_prefix",
                format!("{text:?} is not an absolute path (like \"/owa\"; no spaces, ?, # or %)"),
            ));
        }
        if routes
            .iter()
            .any(|r| r.path_prefix.eq_ignore_ascii_case(prefix))
        {
            return Err(ConfigError::invalid(
                "route.path_prefix",
                format!("{text:?} is given twice (prefixes are matched case-insensitively)"),
            ));
        }
        let in_route = |e: ConfigError| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key: match key {
                    "health_check.path" => "route.health_check.path",
                    "health_check.interval_secs" => "route.health_check.interval_secs",
                    "health_check.timeout_secs" => "route.health_check.timeout_secs",
                    "health_check.expect_status" => "route.health_check.expect_status",
                    _ => "route.backends",
                },
                message: format!("route {prefix}: {message}"),
            },
            other => other,
        };
        if file.backends.is_empty() {
            return Err(ConfigError::invalid(
                "route.backends",
                format!("route {prefix}: no backend"),
            ));
        }
        let backends = file
            .backends
            .iter()
            .map(parse_backend_entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(in_route)?;
        let named = all_backends(default, &routes);
        if let Some(b) = backends.iter().find(|b| {
            named
                .iter()
                .any(|n| n.authority == b.authority && n.tls != b.tls)
        }) {
            return Err(ConfigError::invalid(
                "route.backends",
                format!(
                    "route {prefix}: {} is named elsewhere with other TLS settings; one backend \
                     address has one set of settings",
                    b.authority
                ),
            ));
        }
        let health_check = match file.health_check {
            Some(check) => build_health_check(None, Some(check)).map_err(in_route)?,
            None => None,
        };
        routes.push(RouteConfig {
            path_prefix: prefix.to_string(),
            backends,
            health_check,
        });
    }
    Ok(routes)
}

fn build_lockout(file: LockoutFile) -> Result<LockoutConfig, ConfigError> {
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

fn build_route_timeouts(routes: Vec<RouteTimeoutFile>) -> Result<RouteTimeouts, ConfigError> {
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

/// `[upstream_caps]`; 0 (or absent) turns a cap off.
fn build_upstream_caps(file: UpstreamCapsFile) -> Result<DedicatedCaps, ConfigError> {
    let max_age = match file.max_age_secs {
        None => None,
        Some(0.0) => None,
        Some(s) if s.is_finite() && s > 0.0 && s <= 7.0 * 86_400.0 => {
            Some(Duration::from_secs_f64(s))
        }
        Some(s) => {
            return Err(ConfigError::invalid(
                "upstream_caps.max_age_secs",
                format!("{s} is not a number of seconds between 0 (off) and 604800"),
            ));
        }
    };
    Ok(DedicatedCaps {
        max_age,
        max_requests: file.max_requests.filter(|n| *n > 0),
    })
}

fn build_timeouts(file: TimeoutsFile) -> Result<Timeouts, ConfigError> {
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
fn build_upgrade_socket(path: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(p) if !p.is_absolute() || p.file_name().is_none() => Err(ConfigError::invalid(
            "upgrade_socket",
            format!("{} is not an absolute path to a socket file", p.display()),
        )),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs::default()
    }

    fn key_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an invalid key, got {other}"),
        }
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::from_toml(
            r#"listen = ["0.0.0.0:8080"]
               backends = ["10.0.0.5:80"]"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(c.identity.header.as_str(), "jespa-connection-id");
        assert_eq!(c.identity.template.as_str(), DEFAULT_TEMPLATE);
        assert_eq!(c.ebpf.mode, EbpfMode::Auto);
        assert_eq!(c.ebpf.map_entries, 262_144);
        assert!(c.identity.forwarded_headers);
        assert_eq!(c.backends[0].authority.as_str(), "10.0.0.5:80");
        // Safe with every backend unless the operator opts into sharing authenticated connections.
        assert_eq!(c.mode, Mode::Bind);
    }

    #[test]
    fn route_timeouts_and_upstream_caps() {
        let base = "listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n";
        let c = Config::from_toml(base, &args()).expect("valid");
        assert!(c.route_timeouts.is_empty());
        assert_eq!(c.upstream_caps, DedicatedCaps::default());
        let c = Config::from_toml(
            &format!(
                "{base}[timeouts]\nupstream_response_secs = 30\n\
                 [[timeouts.route]]\npath_prefix = \"/Microsoft-Server-ActiveSync\"\nresponse_secs = 3600\n\
                 [upstream_caps]\nmax_age_secs = 600\nmax_requests = 1000\n"
            ),
            &args(),
        )
        .expect("valid");
        assert_eq!(c.timeouts.upstream_response, Duration::from_secs(30));
        assert_eq!(
            c.route_timeouts
                .response_for("/Microsoft-Server-ActiveSync?Cmd=Ping"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(c.route_timeouts.response_for("/owa/"), None);
        assert_eq!(c.upstream_caps.max_age, Some(Duration::from_secs(600)));
        assert_eq!(c.upstream_caps.max_requests, Some(1000));
        let effective = c.to_toml();
        assert!(effective.contains("[[timeouts.route]]"), "{effective}");
        assert!(effective.contains("[upstream_caps]"), "{effective}");
        // The effective configuration is itself a valid configuration, routes included.
        let again = Config::from_toml(&effective, &args()).expect("round trip");
        assert_eq!(again.to_toml(), effective);
        for (text, key) in [
            (
                "[[timeouts.route]]\npath_prefix = \"ews\"\nresponse_secs = 5",
                "timeouts.route.path_prefix",
            ),
            (
                "[[timeouts.route]]\npath_prefix = \"/ews\"\nresponse_secs = 0",
                "timeouts.route.response_secs",
            ),
            (
                "[upstream_caps]\nmax_age_secs = -1",
                "upstream_caps.max_age_secs",
            ),
        ] {
            match Config::from_toml(&format!("{base}{text}"), &args()) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn lockout_defaults_keys_and_errors() {
        let base = "listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n";
        let c = Config::from_toml(base, &args()).expect("valid");
        assert_eq!(c.lockout, LockoutConfig::default());
        assert!(c.lockout.enabled);
        assert_eq!(c.lockout.max_failures, 4);
        let c = Config::from_toml(
            &format!(
                "{base}[lockout]\nmax_failures = 2\nwindow_secs = 60\nallow = [\"10.0.0.0/8\"]\n\
                 max_failures_per_user = 9\nmax_tracked = 10"
            ),
            &args(),
        )
        .expect("valid");
        assert_eq!(c.lockout.max_failures, 2);
        assert_eq!(c.lockout.window, Duration::from_secs(60));
        assert_eq!(c.lockout.max_failures_per_user, 9);
        assert!(c.to_toml().contains("[lockout]"));
        for (text, key) in [
            ("max_failures = 0", "lockout.max_failures"),
            ("window_secs = 0", "lockout.window_secs"),
            ("window_secs = 1e9", "lockout.window_secs"),
            ("max_tracked = 0", "lockout.max_tracked"),
        ] {
            let e =
                Config::from_toml(&format!("{base}[lockout]\n{text}"), &args()).expect_err(text);
            assert_eq!(key_of(e), key, "{text}");
        }
        assert!(matches!(
            Config::from_toml(&format!("{base}[lockout]\nthreshold = 3"), &args()),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn every_mode_parses_and_an_unknown_one_is_refused() {
        for (text, mode) in [("bind", Mode::Bind), ("tag", Mode::Tag), ("pin", Mode::Pin)] {
            let c = Config::from_toml(
                &format!("listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\nmode = \"{text}\""),
                &args(),
            )
            .expect("valid");
            assert_eq!(c.mode, mode);
            assert_eq!(mode.warning().is_some(), mode == Mode::Tag, "{text}");
        }
        assert!(matches!(
            Config::from_toml("mode = \"share\"", &args()),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn flags_override_the_file() {
        let mut a = args();
        a.listen = vec!["127.0.0.1:9000".parse().expect("addr")];
        a.header = Some("X-Conn".into());
        a.ebpf = Some(EbpfMode::Off);
        let c = Config::from_toml(
            r#"listen = ["0.0.0.0:8080"]
               backends = ["b:80"]
               header = "Other"
               ebpf = "required""#,
            &a,
        )
        .expect("valid");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address.port(), 9000);
        assert_eq!(c.identity.header.as_str(), "x-conn");
        assert_eq!(c.ebpf.mode, EbpfMode::Off);
    }

    #[test]
    fn listeners_as_tables_and_ipv6() {
        let c = Config::from_toml(
            r#"listen = ["[::]:8080", { address = "198.18.0.1:81" }]
               backends = ["[fd00::5]:80"]"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.backends[0].authority.host(), "[fd00::5]");
    }

    #[test]
    fn https_backends_as_addresses_and_tables() {
        let c = Config::from_toml(
            r#"listen = ["0.0.0.0:80"]
               backends = [
                 "10.0.0.5:80",
                 "http://10.0.0.6:8080",
                 "https://exch1.corp.example",
                 { address = "https://10.0.0.7:8443", tls_server_name = "mail.corp.example", ca_file = "/etc/ntlm-tag/ca.pem", client_cert = "/c.pem", client_key = "/c.key" },
               ]"#,
            &args(),
        )
        .expect("valid");
        let shown: Vec<String> = c.backends.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.5:80",
                "10.0.0.6:8080",
                "https://exch1.corp.example:443",
                "https://10.0.0.7:8443"
            ]
        );
        assert_eq!(c.backends[0].tls, None);
        assert_eq!(c.backends[1].tls, None);
        assert_eq!(c.backends[2].tls, Some(BackendTlsConfig::default()));
        let table = c.backends[3].tls.as_ref().expect("tls");
        assert_eq!(table.tls_server_name.as_deref(), Some("mail.corp.example"));
        assert_eq!(
            table.ca_file.as_deref(),
            Some(Path::new("/etc/ntlm-tag/ca.pem"))
        );
        let effective = c.to_toml();
        assert!(
            effective.contains("tls_server_name = \"mail.corp.example\""),
            "{effective}"
        );
        // The flag keeps meaning plain HTTP, and takes https:// too.
        let mut a = args();
        a.backends = vec!["b:80".into(), "https://b".into()];
        let c = Config::from_toml(r#"listen = ["0.0.0.0:80"]"#, &a).expect("valid");
        assert_eq!(c.backends[0].tls, None);
        assert!(c.backends[1].tls.is_some());
        for bad in [
            r#"backends = ["ftp://b:21"]"#,
            r#"backends = ["https://u:p@b"]"#,
            r#"backends = [{ address = "b:80", ca_file = "/ca.pem" }]"#,
            r#"backends = [{ address = "https://b", client_cert = "/c.pem" }]"#,
            r#"backends = [{ address = "https://b", tls_server_name = "a b" }]"#,
        ] {
            let doc = format!("listen = [\"0.0.0.0:80\"]\n{bad}");
            match Config::from_toml(&doc, &args()) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "backends", "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn epa_bridging_needs_a_tls_listener_and_https_backends() {
        const TLS_LISTEN: &str = r#"listen = [{ address = "0.0.0.0:443", tls = [{ cert = "/c.pem", key = "/c.key" }] }]"#;
        for (doc, why) in [
            (
                "listen = [\"0.0.0.0:80\"]\nbackends = [\"https://b\"]\nepa_bridging = true"
                    .to_string(),
                "no listener terminates TLS",
            ),
            (
                format!("{TLS_LISTEN}\nbackends = [\"https://a\", \"b:80\"]\nepa_bridging = true"),
                "backend b:80 is plain HTTP",
            ),
        ] {
            match Config::from_toml(&doc, &args()) {
                Err(ConfigError::Invalid { key, message }) => {
                    assert_eq!(key, "epa_bridging");
                    assert!(message.contains(why), "{message}");
                }
                other => panic!("{doc}: {other:?}"),
            }
        }
        let c = Config::from_toml(
            &format!("{TLS_LISTEN}\nbackends = [\"https://a\"]\nepa_bridging = true"),
            &args(),
        )
        .expect("valid");
        assert!(c.epa_bridging);
        assert!(c.to_toml().contains("epa_bridging = true"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"backends = ["b:80"]"#, "listen"),
            (r#"listen = ["0.0.0.0:1"]"#, "backends"),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["no-port"]"#,
                "backends",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["u:p@b:80"]"#,
                "backends",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                header = "bad header""#,
                "header",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                header = "Host""#,
                "header",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                id_template = "{client}""#,
                "id_template",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                id_template = " {client}/{uid}""#,
                "id_template",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                id_template = "{client}/{uid} ""#,
                "id_template",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                map_entries = 0"#,
                "map_entries",
            ),
            (
                r#"listen = ["0.0.0.0:1"]
                backends = ["b:80"]
                [timeouts]
                upstream_connect_secs = -1"#,
                "timeouts.upstream_connect_secs",
            ),
            (
                r#"listen = ["0.0.0.0:1", "0.0.0.0:1"]
                backends = ["b:80"]"#,
                "listen",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text, &args()).expect_err(text);
            assert_eq!(key_of(err), key, "{text}");
        }
    }

    #[test]
    fn trust_list_proxy_protocol_and_toa() {
        let c = Config::from_toml(
            r#"listen = [{ address = "0.0.0.0:80", proxy_protocol = true }, "0.0.0.0:81"]
               backends = ["b:80"]
               trusted_lbs = ["198.18.5.7/24", "fd00:5418::/48"]
               toa_kind = 200"#,
            &args(),
        )
        .expect("valid");
        assert!(c.listeners[0].proxy_protocol);
        assert!(!c.listeners[1].proxy_protocol);
        assert_eq!(c.trust.proxy[0].to_string(), "198.18.5.0/24");
        assert_eq!(c.ebpf.toa_kind, 200);
        assert_eq!(c.trust.toa, c.trust.proxy, "TOA falls back to trusted_lbs");
        let err = Config::from_toml(
            r#"listen = [{ address = "0.0.0.0:80", proxy_protocol = true }]
               backends = ["b:80"]"#,
            &args(),
        )
        .expect_err("PROXY protocol without a trusted balancer");
        assert_eq!(key_of(err), "trusted_lbs");
        let err = Config::from_toml(
            r#"listen = ["0.0.0.0:80"]
               backends = ["b:80"]
               toa_kind = 2"#,
            &args(),
        )
        .expect_err("MSS is not TOA");
        assert_eq!(key_of(err), "toa_kind");
        assert!(matches!(
            Config::from_toml(
                r#"listen = ["0.0.0.0:80"]
                   backends = ["b:80"]
                   trusted_lbs = ["not-a-cidr"]"#,
                &args()
            ),
            Err(ConfigError::Parse { .. })
        ));
    }

    const BASE: &str = "listen = [\"0.0.0.0:80\"]\nbackends = [\"b:80\"]\n";

    fn with(text: &str, a: &RunArgs) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{text}"), a)
    }

    fn nets(list: &[ipnet::IpNet]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn routes_name_pools_with_checks_of_their_own_and_check_prints_them_back() {
        let text = r#"
            [health_check]
            path = "/healthz"
            [[route]]
            path_prefix = "/owa/"
            backends = ["a:80", "https://c"]
            health_check = { path = "/owa/healthcheck.htm", expect_status = 200 }
            [[route]]
            path_prefix = "/ews"
            backends = ["b:80"]
        "#;
        let c = with(text, &args()).expect("valid");
        assert_eq!(c.routes.len(), 2);
        assert_eq!(
            c.routes[0].path_prefix, "/owa",
            "the trailing slash is dropped"
        );
        let shown: Vec<String> = c.routes[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["a:80", "https://c:443"]);
        let check = c.routes[0].health_check.as_ref().expect("a check");
        assert_eq!(check.path, "/owa/healthcheck.htm");
        assert!(c.routes[1].health_check.is_none(), "no check unless given");
        let all: Vec<String> = c.all_backends().iter().map(ToString::to_string).collect();
        assert_eq!(all, ["b:80", "a:80", "https://c:443"]);
        // `check` prints them, and what it prints is a valid configuration again.
        let printed = c.to_toml();
        assert!(printed.contains("[[route]]") && printed.contains("/owa/healthcheck.htm"));
        let again = Config::from_toml(&printed, &args()).expect("the printed file parses");
        assert_eq!(again.routes.len(), 2);
        assert_eq!(again.routes[0].backends, c.routes[0].backends);
    }

    #[test]
    fn bad_routes_are_refused_naming_the_key() {
        for (text, key) in [
            (
                "[[route]]\npath_prefix = \"/\"\nbackends = [\"a:80\"]",
                "route.path_prefix",
            ),
            (
                "[[route]]\npath_prefix = \"owa\"\nbackends = [\"a:80\"]",
                "route.path_prefix",
            ),
            (
                "[[route]]\npath_prefix = \"/o wa\"\nbackends = [\"a:80\"]",
                "route.path_prefix",
            ),
            (
                "[[route]]\npath_prefix = \"/owa?x\"\nbackends = [\"a:80\"]",
                "route.path_prefix",
            ),
            (
                "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a:80\"]\n\
                 [[route]]\npath_prefix = \"/OWA/\"\nbackends = [\"a:80\"]",
                "route.path_prefix",
            ),
            (
                "[[route]]\npath_prefix = \"/owa\"\nbackends = []",
                "route.backends",
            ),
            (
                "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a\"]",
                "route.backends",
            ),
            (
                "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"https://b:80\"]",
                "route.backends",
            ),
            (
                "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a:80\"]\n\
                 health_check = { path = \"owa\" }",
                "route.health_check.path",
            ),
            (
                "[[route]]\npath_prefix = \"/owa\"\nbackends = [\"a:80\"]\n\
                 health_check = { expect_status = 999 }",
                "route.health_check.expect_status",
            ),
        ] {
            match with(text, &args()) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            with("[[route]]\nbackends = [\"a:80\"]", &args()),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn toa_and_ipip_are_off_unless_configured() {
        let c = with(r#"trusted_lbs = ["198.18.1.0/24"]"#, &args()).expect("valid");
        assert_eq!(c.ebpf.toa_kind, 0, "TOA is off by default");
        assert!(c.trust.toa.is_empty());
        assert!(c.trust.ipip.is_empty());
        assert_eq!(nets(&c.trust.proxy), ["198.18.1.0/24"]);
        // The same with flags: --trusted-lb alone no longer turns TOA on.
        let mut a = args();
        a.trusted_lbs = vec!["198.18.1.100/32".parse().expect("net")];
        let c = Config::from_toml(BASE, &a).expect("valid");
        assert_eq!((c.ebpf.toa_kind, c.trust.toa.len()), (0, 0));
        // toa_kind = 0 is off, as before.
        let c = with("trusted_lbs = [\"198.18.1.0/24\"]\ntoa_kind = 0", &args()).expect("valid");
        assert!(c.trust.toa.is_empty());
        // And off is what `check` prints: no TOA or IPIP list, and the output parses again.
        let text = c.to_toml();
        assert!(text.contains("toa_kind = 0"), "{text}");
        assert!(!text.contains("toa_trusted_lbs") && !text.contains("ipip_trusted_lbs"));
    }

    #[test]
    fn each_mechanism_has_its_own_list_or_falls_back_to_trusted_lbs() {
        // --trusted-lb CIDR --toa-kind 254: TOA from CIDR, as before.
        let mut a = args();
        a.trusted_lbs = vec!["198.18.1.0/24".parse().expect("net")];
        a.toa_kind = Some(254);
        let c = Config::from_toml(BASE, &a).expect("valid");
        assert_eq!(c.ebpf.toa_kind, 254);
        assert_eq!(nets(&c.trust.toa), ["198.18.1.0/24"]);
        // Own lists win over trusted_lbs, flags over the file.
        let c = with(
            r#"trusted_lbs = ["198.18.1.0/24"]
               toa_kind = 254
               toa_trusted_lbs = ["198.18.7.0/24"]
               xdp = ["eth1"]
               ipip_trusted_lbs = ["198.18.8.1/32", "fd00:5418:8::/64"]"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(nets(&c.trust.proxy), ["198.18.1.0/24"]);
        assert_eq!(nets(&c.trust.toa), ["198.18.7.0/24"]);
        assert_eq!(nets(&c.trust.ipip), ["198.18.8.1/32", "fd00:5418:8::/64"]);
        let text = c.to_toml();
        assert!(
            text.contains("toa_trusted_lbs = [\"198.18.7.0/24\"]"),
            "{text}"
        );
        let again = Config::from_toml(&text, &args()).expect("check output re-parses");
        assert_eq!(again.trust, c.trust);
        let mut a = args();
        a.toa_trusted_lbs = vec!["198.18.9.0/24".parse().expect("net")];
        let c = with(
            "trusted_lbs = [\"198.18.1.0/24\"]\ntoa_kind = 200\ntoa_trusted_lbs = [\"198.18.7.0/24\"]",
            &a,
        )
        .expect("valid");
        assert_eq!(nets(&c.trust.toa), ["198.18.9.0/24"]);
        // IPIP falls back to trusted_lbs when XDP is on and it has no list.
        let c = with(
            "trusted_lbs = [\"198.18.1.0/24\"]\nxdp = [\"eth1\"]",
            &args(),
        )
        .expect("valid");
        assert_eq!(nets(&c.trust.ipip), ["198.18.1.0/24"]);
        assert!(c.trust.toa.is_empty());
        // TOA trusted from its own list only: nobody is trusted for PROXY protocol.
        let c = with(
            "toa_kind = 254\ntoa_trusted_lbs = [\"198.18.7.0/24\"]",
            &args(),
        )
        .expect("valid");
        assert!(c.trust.proxy.is_empty());
        assert_eq!(nets(&c.trust.toa), ["198.18.7.0/24"]);
    }

    #[test]
    fn a_list_for_a_mechanism_that_is_off_or_a_mechanism_with_no_list_is_refused() {
        for (text, key) in [
            ("toa_trusted_lbs = [\"198.18.7.0/24\"]", "toa_trusted_lbs"),
            (
                "toa_kind = 0\ntoa_trusted_lbs = [\"198.18.7.0/24\"]",
                "toa_trusted_lbs",
            ),
            ("toa_kind = 254", "toa_trusted_lbs"),
            ("ipip_trusted_lbs = [\"198.18.7.0/24\"]", "ipip_trusted_lbs"),
            ("xdp = [\"eth1\"]", "ipip_trusted_lbs"),
        ] {
            let err = with(text, &args()).expect_err(text);
            assert_eq!(key_of(err), key, "{text}");
        }
        let many: Vec<String> = (0..1025u32)
            .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
            .collect();
        let text = format!("toa_kind = 254\ntoa_trusted_lbs = [{}]", many.join(", "));
        assert_eq!(
            key_of(with(&text, &args()).expect_err("too many")),
            "toa_trusted_lbs"
        );
    }

    #[test]
    fn prefixes_are_normalised_and_whole_families_warned_about_by_key() {
        let c = with(
            r#"trusted_lbs = ["::ffff:198.18.1.0/120", "198.18.1.0/24", "198.18.2.9/24"]"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(nets(&c.trust.proxy), ["198.18.1.0/24", "198.18.2.0/24"]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let c = with(
            r#"trusted_lbs = ["0.0.0.0/0"]
               toa_kind = 254
               xdp = ["eth1"]
               ipip_trusted_lbs = ["::/0"]"#,
            &args(),
        )
        .expect("valid, with warnings");
        let keys: Vec<&str> = c.warnings.iter().map(|w| w.key).collect();
        assert_eq!(
            keys,
            ["trusted_lbs", "ipip_trusted_lbs"],
            "{:?}",
            c.warnings
        );
        let text = c.warnings[0].to_string();
        assert!(
            text.contains("0.0.0.0/0 covers every IPv4 address"),
            "{text}"
        );
        assert!(text.contains("PROXY protocol, TOA"), "{text}");
        assert!(!text.contains("IPIP"), "IPIP has its own list: {text}");
        let c = with(
            r#"toa_kind = 254
                        toa_trusted_lbs = ["::ffff:0.0.0.0/96"]"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(nets(&c.trust.toa), ["0.0.0.0/0"]);
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.warnings[0].key, "toa_trusted_lbs");
    }

    #[test]
    fn backend_modes_balance_and_health_checks() {
        let c = Config::from_toml(
            r#"listen = ["0.0.0.0:80"]
               backends = ["a:80", "b:80"]
               mode = "pin"
               balance = "hash"
               http2 = true
               [health_check]
               path = "/healthz"
               interval_secs = 0.5"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(c.mode, Mode::Pin);
        assert_eq!(c.balance, Balance::Hash);
        assert!(c.http2);
        let h = c.health_check.as_ref().expect("health check");
        assert_eq!((h.path.as_str(), h.expect_status), ("/healthz", 200));
        assert_eq!(h.interval, Duration::from_millis(500));
        let again = Config::from_toml(&c.to_toml(), &args()).expect("round trip");
        assert_eq!(again.to_toml(), c.to_toml());
        for (text, key) in [
            ("[health_check]\npath = \"healthz\"", "health_check.path"),
            (
                "[health_check]\nexpect_status = 42",
                "health_check.expect_status",
            ),
            (
                "[health_check]\ninterval_secs = 0",
                "health_check.interval_secs",
            ),
        ] {
            let doc = format!("listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n{text}");
            assert_eq!(
                key_of(Config::from_toml(&doc, &args()).expect_err(text)),
                key
            );
        }
    }

    #[test]
    fn tls_limits_and_user() {
        let c = Config::from_toml(
            r#"listen = [{ address = "0.0.0.0:443", tls = [{ cert = "/a.pem", key = "/a.key" }] }]
               backends = ["b:80"]
               user = "ntlm-tag"
               [limits]
               max_connections = 5
               max_header_bytes = 16384"#,
            &args(),
        )
        .expect("valid");
        assert_eq!(c.listeners[0].tls[0].cert, PathBuf::from("/a.pem"));
        assert_eq!(c.limits.max_connections, 5);
        assert_eq!(c.user.as_deref(), Some("ntlm-tag"));
        let again = Config::from_toml(&c.to_toml(), &args()).expect("round trip");
        assert_eq!(again.to_toml(), c.to_toml());
        for (text, key) in [
            ("[limits]\nmax_connections = 0", "limits.max_connections"),
            ("[limits]\nmax_header_bytes = 10", "limits.max_header_bytes"),
            ("user = \"a b\"", "user"),
        ] {
            let doc = format!("listen = [\"0.0.0.0:80\"]\nbackends = [\"a:80\"]\n{text}");
            assert_eq!(
                key_of(Config::from_toml(&doc, &args()).expect_err(text)),
                key
            );
        }
        let mut a = args();
        a.tls_cert = vec!["/x.pem".into()];
        assert_eq!(
            key_of(
                Config::from_toml("listen = [\"0.0.0.0:1\"]\nbackends = [\"a:1\"]", &a)
                    .expect_err("pairs")
            ),
            "tls"
        );
    }

    /// The packaged example has every key (commented out, or set like `user`); uncommented, it must
    /// be a valid configuration.
    #[test]
    fn the_packaged_example_lists_valid_keys() {
        let example = include_str!("../../../packaging/ntlm-tag.toml");
        let uncommented: String = example
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .filter(|l| {
                let key = l.split([' ', '=']).next().unwrap_or("");
                l.starts_with('[')
                    || (l.contains(" = ")
                        && !key.is_empty()
                        && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        // Files named in the example do not exist here, and the example's user may not either.
        let uncommented: String = uncommented
            .lines()
            .filter(|l| !l.starts_with("admin_token_file"))
            .map(|l| format!("{l}\n"))
            .collect();
        let uncommented = uncommented.replace(
            "tls = [{ cert = \"/etc/ntlm-tag/tls.pem\", key = \"/etc/ntlm-tag/tls.key\" }]",
            "proxy_protocol = false",
        );
        let c = Config::from_toml(&uncommented, &args())
            .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(c.listeners.len(), 3);
        assert!(c.health_check.is_some());
        assert_eq!(c.routes.len(), 1, "the route example");
        assert!(c.routes[0].health_check.is_some());
        assert!(
            example
                .lines()
                .any(|l| l.trim() == format!("admin = \"{}\"", crate::cli::DEFAULT_ADMIN_SOCKET)),
            "the packaged default admin endpoint is the private unix socket"
        );
        for key in [
            "listen",
            "backends",
            "mode",
            "balance",
            "header",
            "id_template",
            "allow_reusable_ids",
            "forwarded_headers",
            "trusted_lbs",
            "toa_kind",
            "toa_trusted_lbs",
            "xdp",
            "ipip_trusted_lbs",
            "ebpf",
            "map_entries",
            "admin_token_file",
            "show_full_ids",
            "upgrade_socket",
            "workers",
            "http2",
            "user",
            "access_log",
            "log_format",
            "[limits]",
            "[timeouts]",
            "[health_check]",
            "[[route]]",
        ] {
            assert!(
                example.contains(&format!("# {key}")) || example.contains(&format!("\n{key} = ")),
                "the example documents {key}"
            );
        }
    }

    #[test]
    fn upgrade_socket_is_an_absolute_path_and_the_upgrade_drain_has_a_long_default() {
        let c = with("", &args()).expect("base");
        assert_eq!(c.upgrade_socket, None, "upgrades are off unless configured");
        assert_eq!(c.timeouts.upgrade_drain, Duration::from_secs(3600));
        let c = with(
            "upgrade_socket = \"/run/ntlm-tag/upgrade.sock\"\n[timeouts]\nupgrade_drain_secs = 60",
            &args(),
        )
        .expect("valid");
        assert_eq!(
            c.upgrade_socket.as_deref(),
            Some(Path::new("/run/ntlm-tag/upgrade.sock"))
        );
        assert_eq!(c.timeouts.upgrade_drain, Duration::from_secs(60));
        for (text, key) in [
            ("upgrade_socket = \"upgrade.sock\"", "upgrade_socket"),
            ("upgrade_socket = \"/\"", "upgrade_socket"),
            (
                "[timeouts]\nupgrade_drain_secs = -1",
                "timeouts.upgrade_drain_secs",
            ),
        ] {
            let err = with(text, &args()).expect_err(text);
            assert_eq!(key_of(err), key, "{text}");
        }
    }

    fn token_file(mode: u32, token: &str) -> tempfile::NamedTempFile {
        use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(f, "{token}").expect("write");
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        f
    }

    #[test]
    fn admin_endpoints_tokens_and_full_ids() {
        const BASE: &str = "listen = [\"0.0.0.0:1\"]\nbackends = [\"b:80\"]\n";
        let c = Config::from_toml(
            &format!("{BASE}admin = \"unix:/run/ntlm-tag/admin.sock\""),
            &args(),
        )
        .expect("valid");
        let admin = c.admin.as_ref().expect("admin");
        assert_eq!(
            admin.endpoint,
            AdminEndpoint::Unix("/run/ntlm-tag/admin.sock".into())
        );
        assert!(admin.token.is_none());
        assert!(!c.show_full_ids, "hashes by default");

        let token = "0123456789abcdef0123456789abcdef";
        let good = token_file(0o600, token);
        let c = Config::from_toml(
            &format!(
                "{BASE}admin = \"127.0.0.1:9180\"\nadmin_token_file = \"{}\"\nshow_full_ids = true",
                good.path().display()
            ),
            &args(),
        )
        .expect("valid");
        assert!(c.show_full_ids);
        let read = c
            .admin
            .as_ref()
            .and_then(|a| a.token.as_ref())
            .expect("token");
        assert_eq!(read.expose(), token, "the final newline is not part of it");
        let effective = c.to_toml();
        assert!(!effective.contains(token), "{effective}");
        assert!(effective.contains(&good.path().display().to_string()));
        let again = Config::from_toml(&effective, &args()).expect("round trip");
        assert_eq!(again.to_toml(), effective);

        let world = token_file(0o644, token);
        let short = token_file(0o600, "secret");
        for (text, key) in [
            ("admin = \"unix:run/admin.sock\"".to_string(), "admin"),
            ("admin = \"localhost\"".to_string(), "admin"),
            (
                format!(
                    "admin = \"unix:/run/a.sock\"\nadmin_token_file = \"{}\"",
                    good.path().display()
                ),
                "admin_token_file",
            ),
            (
                format!("admin_token_file = \"{}\"", good.path().display()),
                "admin_token_file",
            ),
            (
                format!(
                    "admin = \"127.0.0.1:1\"\nadmin_token_file = \"{}\"",
                    world.path().display()
                ),
                "admin_token_file",
            ),
            (
                format!(
                    "admin = \"127.0.0.1:1\"\nadmin_token_file = \"{}\"",
                    short.path().display()
                ),
                "admin_token_file",
            ),
            (
                "admin = \"127.0.0.1:1\"\nadmin_token_file = \"/nonexistent/token\"".to_string(),
                "admin_token_file",
            ),
        ] {
            let doc = format!("{BASE}{text}");
            assert_eq!(
                key_of(Config::from_toml(&doc, &args()).expect_err(&doc)),
                key,
                "{doc}"
            );
        }
        let mut a = args();
        a.admin = Some("unix:/tmp/x.sock".into());
        a.show_full_ids = true;
        let c = Config::from_toml(BASE, &a).expect("flags");
        assert!(c.show_full_ids);
        assert_eq!(
            c.admin.expect("admin").endpoint.to_string(),
            "unix:/tmp/x.sock"
        );
    }

    #[test]
    fn a_reload_does_not_read_the_admin_token_again() {
        // After `user = ...` the gateway may no longer read the (root's, 0600) token file: a reload
        // must still apply, and the endpoint keeps the token it started with.
        let mut config = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(
            &mut config,
            b"listen = [\"0.0.0.0:1\"]\nbackends = [\"b:80\"]\nadmin = \"127.0.0.1:9180\"\n\
              admin_token_file = \"/nonexistent/admin.token\"\n",
        )
        .expect("write");
        let mut a = args();
        a.config = Some(config.path().to_path_buf());
        assert_eq!(
            key_of(Config::load(&a).expect_err("unreadable at start")),
            "admin_token_file"
        );
        let reloaded = Config::load_for_reload(&a).expect("a reload skips the token");
        let admin = reloaded.admin.expect("admin");
        assert_eq!(
            admin.token_file.as_deref(),
            Some(Path::new("/nonexistent/admin.token"))
        );
        assert!(admin.token.is_none());
    }

    #[test]
    fn reusable_template_needs_explicit_opt_in() {
        let c = Config::from_toml(
            r#"listen = ["0.0.0.0:1"]
               backends = ["b:80"]
               id_template = "{client_ip}:{client_port}"
               allow_reusable_ids = true"#,
            &args(),
        )
        .expect("allowed");
        assert!(c.identity.template.is_reusable());
    }

    #[test]
    fn unknown_keys_and_bad_types_are_parse_errors() {
        for text in ["listn = []", "listen = 5", "ebpf = \"sometimes\""] {
            assert!(matches!(
                Config::from_toml(text, &args()),
                Err(ConfigError::Parse { .. })
            ));
        }
    }

    #[test]
    fn effective_configuration_round_trips() {
        let c = Config::from_toml(
            r#"listen = ["0.0.0.0:8080"]
               backends = ["10.0.0.5:80"]
               admin = "127.0.0.1:9180""#,
            &args(),
        )
        .expect("valid");
        let again = Config::from_toml(&c.to_toml(), &args()).expect("effective config re-parses");
        assert_eq!(again.to_toml(), c.to_toml());
    }

    /// The keys a table of the file accepts, read from serde itself: the error for an unknown key
    /// lists every expected one. A key added to a struct is then a key this test knows about.
    fn schema_keys<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err =
            toml::from_str::<T>("surely_not_a_key = 0").expect_err("unknown keys are refused");
        let message = err.to_string();
        let expected = message
            .split_once("expected")
            .unwrap_or_else(|| panic!("no list of expected keys in {message:?}"))
            .1;
        let keys: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(!keys.is_empty(), "no keys in {message:?}");
        keys
    }

    /// Every key of the file, top level and in every table, is documented in ntlm-tag.toml(5)
    /// (as `\fBkey\fR`), and every key the page documents exists: the page cannot drift.
    #[test]
    fn the_manual_page_documents_every_key() {
        let page = crate::manual::CONFIG_PAGE;
        let keys: Vec<String> = [
            schema_keys::<FileConfig>(),
            schema_keys::<ListenerConfig>(),
            schema_keys::<TlsCertConfig>(),
            schema_keys::<BackendTable>(),
            schema_keys::<LimitsFile>(),
            schema_keys::<TimeoutsFile>(),
            schema_keys::<LockoutFile>(),
            schema_keys::<HealthCheckFile>(),
            schema_keys::<RouteFile>(),
            schema_keys::<RouteTimeoutFile>(),
            schema_keys::<UpstreamCapsFile>(),
        ]
        .concat();
        assert!(keys.len() > 40, "{keys:?}");
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !page.contains(&format!("\\fB{k}\\fR")))
            .collect();
        assert!(missing.is_empty(), "ntlm-tag.toml(5) lacks {missing:?}");
        // `\fBkey\fR = \fItype\fR` entries (and `\fBkey\fR (default ...)` in [timeouts]).
        let documented: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("\\fB"))
            .filter_map(|l| l.split_once("\\fR"))
            .filter(|(_, rest)| rest.starts_with(" = ") || rest.starts_with(" (default"))
            .map(|(key, _)| key)
            .collect();
        let unknown: Vec<&&str> = documented
            .iter()
            .filter(|k| !keys.iter().any(|key| key == *k))
            .collect();
        assert!(
            unknown.is_empty(),
            "ntlm-tag.toml(5) documents unknown keys {unknown:?}"
        );
    }
}
