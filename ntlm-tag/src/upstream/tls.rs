//! TLS to backends (rustls client): the server name sent as SNI and checked in the certificate,
//! the roots that certificate must chain to (a CA file, or the system's trust store), and an
//! optional client certificate. One [`BackendTls`] per `https://` backend, built when the
//! configuration is applied (start-up and reload), so a bad file refuses the configuration instead
//! of failing every connection later.
//!
//! System roots come from `rustls-native-certs` (the rustls project's reader of the OS trust
//! store), not `webpki-roots`: backends such as Exchange and IIS usually carry certificates of an
//! enterprise CA that the operator has installed in the system store, and that a compiled-in copy
//! of the public roots would never trust.
#![forbid(unsafe_code)]

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    },
};

/// How to talk TLS to one backend, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendTlsConfig {
    /// SNI and the name the certificate must hold (default: the backend's host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// PEM file of the CA certificates the backend's certificate must chain to (default: the
    /// system's trust store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a backend that asks for a client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// The private key of `client_cert` (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum BackendTlsError {
    #[error("{name:?} is not a valid TLS server name (set tls_server_name to a DNS name or an IP)")]
    ServerName { name: String },
    #[error("cannot read the CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("the CA file {path} holds no usable CA certificate")]
    NoCa { path: PathBuf },
    #[error(
        "no trusted root certificates in the system store ({message}); set ca_file to the CA that \
         signed the backend's certificate"
    )]
    NoSystemRoots { message: String },
    #[error("cannot read the client certificate {path}: {message}")]
    ClientCert { path: PathBuf, message: String },
    #[error("cannot read the client key {path}: {message}")]
    ClientKey { path: PathBuf, message: String },
    #[error("client_cert and client_key go together: set both or neither")]
    ClientPair,
    #[error("TLS client configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A ready TLS client for one backend.
pub struct BackendTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl BackendTls {
    /// Reads the files `config` names. `host` is the backend's host, the default server name.
    pub fn new(config: &BackendTlsConfig, host: &str) -> Result<Self, BackendTlsError> {
        let name = config
            .tls_server_name
            .clone()
            .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| BackendTlsError::ServerName { name })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(config.ca_file.as_ref())?);
        let mut client = match (&config.client_cert, &config.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let (chain, key) = client_identity(cert, key)?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => return Err(BackendTlsError::ClientPair),
        };
        // The upstream side speaks HTTP/1.1 only (NTLM authenticates a connection; HTTP/2 would
        // multiplex several clients' requests on it).
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(BackendTls {
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// The server name sent as SNI and checked in the backend's certificate.
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// The TLS handshake on a connected socket; the backend's certificate is verified.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }
}

/// The leaf certificate a finished handshake received.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.clone().into_owned())
}

fn roots(ca_file: Option<&PathBuf>) -> Result<RootCertStore, BackendTlsError> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect())
                .map_err(|e| BackendTlsError::CaFile {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(BackendTlsError::NoCa { path: path.clone() });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let message = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_string(), ToString::to_string);
                return Err(BackendTlsError::NoSystemRoots { message });
            }
        }
    }
    Ok(store)
}

fn client_identity(
    cert: &PathBuf,
    key: &PathBuf,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BackendTlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| BackendTlsError::ClientCert {
            path: cert.clone(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(BackendTlsError::ClientCert {
            path: cert.clone(),
            message: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| BackendTlsError::ClientKey {
        path: key.clone(),
        message: e.to_string(),
    })?;
    Ok((chain, key))
}

/// SHA-256 of the DER certificate, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_look_like_openssls() {
        let fp = fingerprint(&CertificateDer::from(b"abc".to_vec()));
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(fp.starts_with("BA:78:16:BF"), "{fp}");
    }

    #[test]
    fn a_missing_ca_file_and_half_a_client_identity_are_errors() {
        let missing = BackendTlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            BackendTls::new(&missing, "b.example"),
            Err(BackendTlsError::CaFile { .. })
        ));
        let half = BackendTlsConfig {
            client_cert: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        };
        // The roots are read first; with none in a test container either error is fine, but
        // never a working client.
        assert!(BackendTls::new(&half, "b.example").is_err());
        let bad_name = BackendTlsConfig {
            tls_server_name: Some("not a name".into()),
            ..Default::default()
        };
        assert!(matches!(
            BackendTls::new(&bad_name, "b.example"),
            Err(BackendTlsError::ServerName { .. })
        ));
    }
}
