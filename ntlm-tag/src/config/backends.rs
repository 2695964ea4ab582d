//! Backends, routes and their health checks: addresses parsed (`HOST:PORT` or `https://HOST`),
//! route prefixes checked, and one backend named the same way wherever it appears.
#![forbid(unsafe_code)]

use std::time::Duration;

use http::uri::Authority;

use crate::upstream::{
    BackendAddress, DedicatedCaps, HealthCheckConfig, RouteConfig, tls::BackendTlsConfig,
};

use super::{ConfigError, file::*};

pub(super) fn parse_backend_entry(entry: &BackendEntry) -> Result<BackendAddress, ConfigError> {
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
pub(super) fn parse_backend(text: &str) -> Result<(Authority, bool), ConfigError> {
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

pub(super) fn build_health_check(
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
pub(super) fn all_backends(
    default: &[BackendAddress],
    routes: &[RouteConfig],
) -> Vec<BackendAddress> {
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
pub(super) fn build_routes(
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

/// `[upstream_caps]`; 0 (or absent) turns a cap off.
pub(super) fn build_upstream_caps(file: UpstreamCapsFile) -> Result<DedicatedCaps, ConfigError> {
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
