//! Configuration: the TOML file, with command-line flags merged over it, validated once at start-up.
//! Every error names the offending key so that `ntlm-tag check` and start-up can say exactly what to fix.
#![forbid(unsafe_code)]

mod backends;
mod build;
mod file;
mod render;
#[cfg(test)]
mod tests;
mod trust;

use std::path::PathBuf;

use thiserror::Error;

use crate::{
    admin::AdminConfig,
    cli::{LogFormat, RunArgs},
    guard::LockoutConfig,
    identity::{IdentityConfig, trust::TrustLists},
    kernel::{EbpfConfig, KernelOptions},
    proxy::{Limits, ListenerConfig, route_timeouts::RouteTimeouts},
    upstream::{
        BackendAddress, Balance, DedicatedCaps, HealthCheckConfig, Mode, RouteConfig, Timeouts,
    },
};

use backends::all_backends;
#[cfg(test)]
use file::parse_file;
use file::{FileConfig, read_file};

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

    /// What the kernel programs are configured with: built from the `ebpf` keys and the TOA and
    /// IPIP trust lists, at start and on every reload.
    pub fn kernel_options(&self) -> KernelOptions {
        KernelOptions {
            map_entries: self.ebpf.map_entries,
            toa_kind: self.ebpf.toa_kind,
            toa_trusted: self.trust.toa.clone(),
            ipip_trusted: self.trust.ipip.clone(),
            xdp_interfaces: self.ebpf.xdp_interfaces.clone(),
        }
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
        let file = parse_file(text, std::path::Path::new("<config>"))?;
        Self::build(file, args, Secrets::Read)
    }
}
