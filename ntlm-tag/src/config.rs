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
    admin::{AdminEndpoint, AdminToken},
    cli::{EbpfMode, LogFormat, RunArgs},
    guard::LockoutConfig,
    identity::conn_id::{DEFAULT_TEMPLATE, IdTemplate},
    proxy::{rewrite::is_reserved_header, tls::TlsCertConfig},
    upstream::{Balance, Mode},
};

pub const DEFAULT_HEADER: &str = "Jespa-Connection-Id";

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

/// One listening address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// Expect a PROXY protocol header (v1 or v2) from a trusted balancer before any HTTP.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Terminate TLS with these certificates (the first is the default; others are chosen by SNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<TlsCertConfig>,
}

/// The file's keys. Every key is optional; defaults are applied in [`Config::build`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<ListenEntry>>,
    trusted_lbs: Option<Vec<ipnet::IpNet>>,
    toa_kind: Option<u8>,
    xdp: Option<Vec<String>>,
    backends: Option<Vec<String>>,
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
    workers: Option<usize>,
    log_format: Option<LogFormat>,
    timeouts: Option<TimeoutsFile>,
    lockout: Option<LockoutFile>,
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

/// Resource limits.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// Client connections open at once; more are refused with 503 and counted.
    pub max_connections: usize,
    /// Largest request head (request line + headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Shared (pooled) upstream connections per backend (0: no cap); requests queue for a free
    /// one, within the upstream response timeout. Bound and pinned connections are not counted.
    pub max_upstream_per_backend: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            // Negotiate/Kerberos tokens of users in many groups run to tens of kilobytes.
            max_header_bytes: 64 * 1024,
            max_upstream_per_backend: 0,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckFile {
    path: Option<String>,
    interval_secs: Option<f64>,
    timeout_secs: Option<f64>,
    expect_status: Option<u16>,
}

/// Active health checks of the backends.
#[derive(Debug, Clone, Serialize)]
pub struct HealthCheckConfig {
    pub path: String,
    #[serde(serialize_with = "secs", rename = "interval_secs")]
    pub interval: Duration,
    #[serde(serialize_with = "secs", rename = "timeout_secs")]
    pub timeout: Duration,
    pub expect_status: u16,
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
    proxy_header_secs: Option<f64>,
}

/// How connection ids are made and which headers carry identity.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub header: HeaderName,
    pub template: IdTemplate,
    /// Set X-Forwarded-For, X-Forwarded-Proto and Forwarded to the original client (client-sent copies
    /// are always removed).
    pub forwarded_headers: bool,
}

#[derive(Debug, Clone)]
pub struct EbpfConfig {
    pub mode: EbpfMode,
    pub map_entries: u32,
    /// TCP option kind of TOA; 0: off.
    pub toa_kind: u8,
    /// Interfaces with the IPIP-decapsulating XDP program.
    pub xdp_interfaces: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "secs", rename = "upstream_connect_secs")]
    pub upstream_connect: Duration,
    #[serde(serialize_with = "secs", rename = "upstream_response_secs")]
    pub upstream_response: Duration,
    #[serde(serialize_with = "secs", rename = "upstream_idle_secs")]
    pub upstream_idle: Duration,
    #[serde(serialize_with = "secs", rename = "header_read_secs")]
    pub header_read: Duration,
    /// Keep-alive idle time between requests on a client connection.
    #[serde(serialize_with = "secs", rename = "idle_secs")]
    pub idle: Duration,
    #[serde(serialize_with = "secs", rename = "drain_secs")]
    pub drain: Duration,
    #[serde(serialize_with = "secs", rename = "proxy_header_secs")]
    pub proxy_header: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            upstream_connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(90),
            header_read: Duration::from_secs(15),
            // IIS's default connection timeout: authenticated NTLM connections survive think time.
            idle: Duration::from_secs(120),
            drain: Duration::from_secs(10),
            proxy_header: Duration::from_secs(5),
        }
    }
}

/// The admin endpoint and who may read its private pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub endpoint: AdminEndpoint,
    /// With a TCP endpoint: the file with the bearer token.
    pub token_file: Option<PathBuf>,
    /// The token, read (and checked) at start; a reload does not read it again (see
    /// [`Config::load_for_reload`]).
    pub token: Option<AdminToken>,
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
    pub backends: Vec<Authority>,
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
    /// Balancer prefixes allowed to convey client identity.
    pub trusted_lbs: Vec<ipnet::IpNet>,
    pub ebpf: EbpfConfig,
    pub admin: Option<AdminConfig>,
    /// Show full connection ids in logs and the admin table (else keyed hashes).
    pub show_full_ids: bool,
    pub workers: usize,
    pub log_format: LogFormat,
    pub timeouts: Timeouts,
    pub lockout: LockoutConfig,
}

impl Config {
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

        let backend_texts = if !args.backends.is_empty() {
            args.backends.clone()
        } else {
            file.backends.unwrap_or_default()
        };
        if backend_texts.is_empty() {
            return Err(ConfigError::invalid(
                "backends",
                "no backend: give --backend HOST:PORT or `backends = [\"10.0.0.5:8080\"]`",
            ));
        }
        let backends = backend_texts
            .iter()
            .map(|b| parse_backend(b))
            .collect::<Result<Vec<_>, _>>()?;

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

        let map_entries = args
            .map_entries
            .or(file.map_entries)
            .unwrap_or(ntlm_tag_common::CONN_IDENTITY_DEFAULT_ENTRIES);
        if map_entries == 0 {
            return Err(ConfigError::invalid("map_entries", "must be at least 1"));
        }

        let timeouts = build_timeouts(file.timeouts.unwrap_or_default())?;

        let trusted_lbs: Vec<ipnet::IpNet> = if !args.trusted_lbs.is_empty() {
            args.trusted_lbs.clone()
        } else {
            file.trusted_lbs.unwrap_or_default()
        };
        let trusted_lbs: Vec<ipnet::IpNet> = trusted_lbs.iter().map(ipnet::IpNet::trunc).collect();
        if trusted_lbs.len() > ntlm_tag_common::TRUSTED_LB_ENTRIES as usize {
            return Err(ConfigError::invalid(
                "trusted_lbs",
                format!(
                    "{} prefixes; at most {} fit the kernel's table",
                    trusted_lbs.len(),
                    ntlm_tag_common::TRUSTED_LB_ENTRIES
                ),
            ));
        }
        if let Some(l) = listeners.iter().find(|l| l.proxy_protocol)
            && trusted_lbs.is_empty()
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
        if !xdp_interfaces.is_empty() && trusted_lbs.is_empty() {
            return Err(ConfigError::invalid(
                "trusted_lbs",
                "XDP decapsulation only accepts tunnels from trusted balancers; add --trusted-lb CIDR",
            ));
        }
        let toa_kind = args
            .toa_kind
            .or(file.toa_kind)
            .unwrap_or(ntlm_tag_common::DEFAULT_TOA_KIND as u8);
        if matches!(toa_kind, 1 | 2 | 3 | 4 | 5 | 8) {
            return Err(ConfigError::invalid(
                "toa_kind",
                format!(
                    "{toa_kind} is a standard TCP option (NOP/MSS/WS/SACK/timestamps), not TOA"
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
            trusted_lbs,
            ebpf: EbpfConfig {
                mode: args.ebpf.or(file.ebpf).unwrap_or(EbpfMode::Auto),
                map_entries,
                toa_kind,
                xdp_interfaces,
            },
            admin,
            show_full_ids: args.show_full_ids || file.show_full_ids.unwrap_or(false),
            workers: args.workers.or(file.workers).unwrap_or(0),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            timeouts,
            lockout,
        })
    }

    /// The effective configuration as TOML, for `ntlm-tag check`.
    pub fn to_toml(&self) -> String {
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
            xdp: &'a [String],
            backends: Vec<String>,
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
            workers: usize,
            log_format: LogFormat,
            timeouts: Timeouts,
            lockout: &'a LockoutConfig,
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
            trusted_lbs: &self.trusted_lbs,
            toa_kind: self.ebpf.toa_kind,
            xdp: &self.ebpf.xdp_interfaces,
            backends: self.backends.iter().map(ToString::to_string).collect(),
            header: self.identity.header.as_str(),
            id_template: self.identity.template.as_str(),
            allow_reusable_ids: self.identity.template.is_reusable(),
            forwarded_headers: self.identity.forwarded_headers,
            ebpf: self.ebpf.mode,
            map_entries: self.ebpf.map_entries,
            admin: self.admin.as_ref().map(|a| a.endpoint.to_string()),
            admin_token_file: self.admin.as_ref().and_then(|a| a.token_file.as_deref()),
            show_full_ids: self.show_full_ids,
            workers: self.workers,
            log_format: self.log_format,
            timeouts: self.timeouts,
            lockout: &self.lockout,
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

fn parse_backend(text: &str) -> Result<Authority, ConfigError> {
    let authority: Authority = text
        .parse()
        .map_err(|_| ConfigError::invalid("backends", format!("{text:?} is not HOST:PORT")))?;
    if authority.port_u16().is_none() {
        return Err(ConfigError::invalid(
            "backends",
            format!("{text:?} has no port (write HOST:PORT)"),
        ));
    }
    if text.contains('@') {
        return Err(ConfigError::invalid(
            "backends",
            format!("{text:?}: credentials are not allowed in a backend address"),
        ));
    }
    Ok(authority)
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
        proxy_header: pick(
            "timeouts.proxy_header_secs",
            file.proxy_header_secs,
            d.proxy_header,
        )?,
    })
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
        assert_eq!(c.backends[0].as_str(), "10.0.0.5:80");
        // Safe with every backend unless the operator opts into sharing authenticated connections.
        assert_eq!(c.mode, Mode::Bind);
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
        assert_eq!(c.backends[0].host(), "[fd00::5]");
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
        assert_eq!(c.trusted_lbs[0].to_string(), "198.18.5.0/24");
        assert_eq!(c.ebpf.toa_kind, 200);
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
        let example = include_str!("../../packaging/ntlm-tag.toml");
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
            "xdp",
            "ebpf",
            "map_entries",
            "admin_token_file",
            "show_full_ids",
            "workers",
            "http2",
            "user",
            "access_log",
            "log_format",
            "[limits]",
            "[timeouts]",
            "[health_check]",
        ] {
            assert!(
                example.contains(&format!("# {key}")) || example.contains(&format!("\n{key} = ")),
                "the example documents {key}"
            );
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
}
