//! The TLS-bridging check (`epa_bridging = true`): every TLS backend must present the same leaf
//! certificate as the TLS listeners that forward to it, so that a client's `tls-server-end-point`
//! channel binding matches on both legs. The backend's certificate is fetched with a real TLS
//! handshake (verified like every upstream connection, with the backend's server name as SNI), and
//! compared with the certificate each listener would present for that same name.
#![forbid(unsafe_code)]

use std::{fmt, net::SocketAddr, time::Duration};

use thiserror::Error;
use tokio::net::TcpStream;

use crate::{
    proxy::tls::{TlsError, leaf_for_name},
    upstream::{
        BackendAddress,
        tls::{BackendTls, BackendTlsError, fingerprint, peer_leaf},
    },
};

/// What the check found for one (listener, backend) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The same leaf certificate on both legs: channel bindings match.
    Same { fingerprint: String },
    /// Different leaf certificates: EPA-protected logins through the gateway fail with 401.
    Differs { listener: String, backend: String },
    /// The backend could not be reached (or its certificate did not verify): not known.
    Unverified { error: String },
}

/// One checked pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub listener: SocketAddr,
    pub backend: String,
    pub server_name: String,
    pub outcome: Outcome,
}

impl Finding {
    pub fn is_mismatch(&self) -> bool {
        matches!(self.outcome, Outcome::Differs { .. })
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (listener, backend, name) = (self.listener, &self.backend, &self.server_name);
        match &self.outcome {
            Outcome::Same { fingerprint } => write!(
                f,
                "epa_bridging: backend {backend} presents the same certificate as listener \
                 {listener} for {name} (sha256 {fingerprint}): clients' channel bindings match on \
                 both legs"
            ),
            Outcome::Differs {
                listener: ours,
                backend: theirs,
            } => write!(
                f,
                "epa_bridging: backend {backend} presents certificate sha256 {theirs} for {name}, \
                 listener {listener} presents sha256 {ours}: Extended Protection logins through the \
                 gateway will be refused (401). Install the same certificate and key on the \
                 listener and the backend"
            ),
            Outcome::Unverified { error } => write!(
                f,
                "epa_bridging: cannot fetch the certificate of backend {backend} ({name}) to compare \
                 it with listener {listener}: {error}; EPA logins fail if it differs"
            ),
        }
    }
}

#[derive(Debug, Error)]
pub enum BridgingError {
    #[error("listener {listener}: {source}")]
    Listener {
        listener: SocketAddr,
        #[source]
        source: TlsError,
    },
    #[error("backend {backend}: {source}")]
    Backend {
        backend: String,
        #[source]
        source: BackendTlsError,
    },
}

/// Why a configuration cannot bridge at all (known without a handshake): `None` when it can.
pub fn unbridgeable(
    listeners: &[crate::proxy::ListenerConfig],
    backends: &[BackendAddress],
) -> Option<String> {
    if !listeners.iter().any(|l| !l.tls.is_empty()) {
        return Some(
            "no listener terminates TLS, so clients send no channel binding to bridge; give a \
             listener `tls = [{ cert = ..., key = ... }]` with the backends' certificate"
                .to_string(),
        );
    }
    backends.iter().find(|b| b.tls.is_none()).map(|b| {
        format!(
            "backend {b} is plain HTTP: a backend with Extended Protection refuses channel bindings \
             made for the gateway's certificate over an offloaded connection (unsupported by \
             Microsoft); write it https://{}",
            b.authority
        )
    })
}

/// Fetches every TLS backend's certificate and compares it with every TLS listener's.
pub async fn verify(
    listeners: &[crate::proxy::ListenerConfig],
    backends: &[BackendAddress],
    timeout: Duration,
) -> Result<Vec<Finding>, BridgingError> {
    let mut findings = Vec::new();
    for backend in backends {
        let Some(tls_config) = &backend.tls else {
            continue;
        };
        let tls = BackendTls::new(tls_config, backend.authority.host()).map_err(|source| {
            BridgingError::Backend {
                backend: backend.to_string(),
                source,
            }
        })?;
        let server_name = tls.server_name();
        let fetched = fetch_leaf(&tls, backend, timeout).await;
        for listener in listeners.iter().filter(|l| !l.tls.is_empty()) {
            let ours = leaf_for_name(&listener.tls, &server_name)
                .map_err(|source| BridgingError::Listener {
                    listener: listener.address,
                    source,
                })?
                .map(|c| fingerprint(&c));
            let outcome = match (&fetched, ours) {
                (Err(error), _) => Outcome::Unverified {
                    error: error.clone(),
                },
                (Ok(theirs), Some(ours)) if *theirs == ours => Outcome::Same { fingerprint: ours },
                (Ok(theirs), ours) => Outcome::Differs {
                    listener: ours.unwrap_or_else(|| "(none)".into()),
                    backend: theirs.clone(),
                },
            };
            findings.push(Finding {
                listener: listener.address,
                backend: backend.to_string(),
                server_name: server_name.clone(),
                outcome,
            });
        }
    }
    Ok(findings)
}

async fn fetch_leaf(
    tls: &BackendTls,
    backend: &BackendAddress,
    timeout: Duration,
) -> Result<String, String> {
    let host = backend.authority.host().trim_matches(['[', ']']);
    let port = backend.authority.port_u16().unwrap_or(443);
    let handshake = async {
        let tcp = TcpStream::connect((host, port)).await?;
        tls.connect(tcp).await
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(stream)) => peer_leaf(&stream)
            .map(|c| fingerprint(&c))
            .ok_or_else(|| "the backend sent no certificate".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
    }
}

/// Logs every finding (info, error, warn); true when a certificate differs.
pub fn log(findings: &[Finding]) -> bool {
    for f in findings {
        match f.outcome {
            Outcome::Same { .. } => tracing::info!("{f}"),
            Outcome::Differs { .. } => tracing::error!("{f}"),
            Outcome::Unverified { .. } => tracing::warn!("{f}"),
        }
    }
    findings.iter().any(Finding::is_mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_backends_and_plain_listeners_cannot_bridge() {
        let plain_listener = crate::proxy::ListenerConfig {
            address: "0.0.0.0:80".parse().expect("addr"),
            proxy_protocol: false,
            tls: vec![],
        };
        let tls_listener = crate::proxy::ListenerConfig {
            tls: vec![crate::proxy::tls::TlsCertConfig {
                cert: "/c.pem".into(),
                key: "/c.key".into(),
            }],
            ..plain_listener.clone()
        };
        let plain = BackendAddress::plain("b:80".parse().expect("authority"));
        let https = BackendAddress {
            tls: Some(Default::default()),
            ..plain.clone()
        };
        assert!(
            unbridgeable(
                std::slice::from_ref(&plain_listener),
                std::slice::from_ref(&https)
            )
            .is_some()
        );
        let why = unbridgeable(std::slice::from_ref(&tls_listener), &[https.clone(), plain])
            .expect("a plain backend");
        assert!(why.contains("backend b:80 is plain HTTP"), "{why}");
        assert_eq!(unbridgeable(&[tls_listener], &[https]), None);
    }
}
