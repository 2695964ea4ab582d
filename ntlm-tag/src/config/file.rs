//! The file as written: every key optional, unknown keys refused. Defaults and checks are applied
//! when the configuration is built (`build.rs`).
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    cli::LogFormat,
    kernel::EbpfMode,
    proxy::ListenerConfig,
    upstream::{Balance, Mode},
};

use super::ConfigError;

/// A listener as written in the file: an address, or a table with per-listener settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum ListenEntry {
    Address(SocketAddr),
    Table(ListenerConfig),
}

/// A backend as written in the file: an address (`HOST:PORT` plain HTTP, `https://HOST[:PORT]`
/// TLS), or a table with TLS settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum BackendEntry {
    Address(String),
    Table(BackendTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackendTable {
    pub(super) address: String,
    pub(super) tls_server_name: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
}

/// The file's keys. Every key is optional; defaults are applied in [`Config::build`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<Vec<ListenEntry>>,
    pub(super) trusted_lbs: Option<Vec<ipnet::IpNet>>,
    pub(super) toa_kind: Option<u8>,
    pub(super) toa_trusted_lbs: Option<Vec<ipnet::IpNet>>,
    pub(super) ipip_trusted_lbs: Option<Vec<ipnet::IpNet>>,
    pub(super) xdp: Option<Vec<String>>,
    pub(super) backends: Option<Vec<BackendEntry>>,
    pub(super) route: Option<Vec<RouteFile>>,
    pub(super) epa_bridging: Option<bool>,
    pub(super) mode: Option<Mode>,
    pub(super) balance: Option<Balance>,
    pub(super) health_check: Option<HealthCheckFile>,
    pub(super) http2: Option<bool>,
    pub(super) user: Option<String>,
    pub(super) access_log: Option<bool>,
    pub(super) limits: Option<LimitsFile>,
    pub(super) header: Option<String>,
    pub(super) id_template: Option<String>,
    pub(super) allow_reusable_ids: Option<bool>,
    pub(super) forwarded_headers: Option<bool>,
    pub(super) ebpf: Option<EbpfMode>,
    pub(super) map_entries: Option<u32>,
    pub(super) admin: Option<String>,
    pub(super) admin_token_file: Option<PathBuf>,
    pub(super) show_full_ids: Option<bool>,
    pub(super) upgrade_socket: Option<PathBuf>,
    pub(super) workers: Option<usize>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) timeouts: Option<TimeoutsFile>,
    pub(super) lockout: Option<LockoutFile>,
    pub(super) upstream_caps: Option<UpstreamCapsFile>,
}

/// `[upstream_caps]`: see [`DedicatedCaps`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamCapsFile {
    pub(super) max_age_secs: Option<f64>,
    pub(super) max_requests: Option<u64>,
}

/// `[lockout]`: see [`LockoutConfig`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LockoutFile {
    pub(super) enabled: Option<bool>,
    pub(super) max_failures: Option<u32>,
    pub(super) max_failures_per_address: Option<u32>,
    pub(super) max_failures_per_user: Option<u32>,
    pub(super) window_secs: Option<f64>,
    pub(super) allow: Option<Vec<ipnet::IpNet>>,
    pub(super) max_tracked: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsFile {
    pub(super) max_connections: Option<usize>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_upstream_per_backend: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthCheckFile {
    pub(super) path: Option<String>,
    pub(super) interval_secs: Option<f64>,
    pub(super) timeout_secs: Option<f64>,
    pub(super) expect_status: Option<u16>,
}

/// `[[route]]` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteFile {
    pub(super) path_prefix: String,
    pub(super) backends: Vec<BackendEntry>,
    pub(super) health_check: Option<HealthCheckFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TimeoutsFile {
    pub(super) upstream_connect_secs: Option<f64>,
    pub(super) upstream_response_secs: Option<f64>,
    pub(super) upstream_idle_secs: Option<f64>,
    pub(super) header_read_secs: Option<f64>,
    pub(super) idle_secs: Option<f64>,
    pub(super) drain_secs: Option<f64>,
    pub(super) upgrade_drain_secs: Option<f64>,
    pub(super) proxy_header_secs: Option<f64>,
    pub(super) route: Option<Vec<RouteTimeoutFile>>,
}

/// One `[[timeouts.route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteTimeoutFile {
    pub(super) path_prefix: String,
    pub(super) response_secs: f64,
}

pub(super) fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text, path)
}

pub(super) fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}
