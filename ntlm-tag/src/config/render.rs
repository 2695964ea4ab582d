//! The effective configuration as TOML, as `ntlm-tag check` prints it.
#![forbid(unsafe_code)]

use std::path::Path;

use serde::Serialize;

use crate::{
    cli::LogFormat,
    guard::LockoutConfig,
    kernel::EbpfMode,
    proxy::{Limits, ListenerConfig, route_timeouts::RouteTimeouts},
    upstream::{
        BackendAddress, Balance, DedicatedCaps, HealthCheckConfig, Mode, Timeouts,
        tls::BackendTlsConfig,
    },
};

use super::Config;

impl Config {
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
