//! TLS termination with rustls: certificate/key files per listener, several certificates chosen by
//! SNI (the first is the default), ALPN `http/1.1` (plus `h2` when HTTP/2 is enabled).
#![forbid(unsafe_code)]

use std::{fmt, path::PathBuf, sync::Arc};

use thiserror::Error;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        crypto::ring::sign::any_supported_type,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
};

/// One certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("cannot read private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error(
        "certificate {path} and its key do not go together or the key type is unsupported: {message}"
    )]
    Pair { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

struct Entry {
    key: Arc<CertifiedKey>,
}

/// Picks the first certificate valid for the client's SNI name; the first one without SNI or match.
struct SniResolver {
    entries: Vec<Entry>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SniResolver({} certificates)", self.entries.len())
    }
}

impl SniResolver {
    /// The certificate a client asking for `name` gets: the first valid for it, else the first.
    fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let first = self.entries.first().map(|e| Arc::clone(&e.key));
        let Some(name) = name else {
            return first;
        };
        let Ok(name) = ServerName::try_from(name) else {
            return first;
        };
        self.entries
            .iter()
            .find(|e| {
                e.key.cert.first().is_some_and(|leaf| {
                    webpki::EndEntityCert::try_from(leaf)
                        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
                })
            })
            .map(|e| Arc::clone(&e.key))
            .or(first)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.for_name(hello.server_name())
    }
}

/// The leaf certificate a listener with `certs` presents to a client asking for `name` (by SNI,
/// the same choice as a real handshake).
pub fn leaf_for_name(
    certs: &[TlsCertConfig],
    name: &str,
) -> Result<Option<CertificateDer<'static>>, TlsError> {
    let entries = certs.iter().map(load).collect::<Result<Vec<_>, _>>()?;
    Ok(SniResolver { entries }
        .for_name(Some(name))
        .and_then(|key| key.cert.first().cloned()))
}

fn load(pair: &TlsCertConfig) -> Result<Entry, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
        .and_then(|it| it.collect())
        .map_err(|e| TlsError::Cert {
            path: pair.cert.clone(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Cert {
            path: pair.cert.clone(),
            message: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| TlsError::Key {
        path: pair.key.clone(),
        message: e.to_string(),
    })?;
    let signing = any_supported_type(&key).map_err(|e| TlsError::Pair {
        path: pair.cert.clone(),
        message: e.to_string(),
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Pair {
        path: pair.cert.clone(),
        message: e.to_string(),
    })?;
    Ok(Entry {
        key: Arc::new(certified),
    })
}

/// Builds the acceptor of one listener.
pub fn acceptor(certs: &[TlsCertConfig], http2: bool) -> Result<TlsAcceptor, TlsError> {
    let entries = certs.iter().map(load).collect::<Result<Vec<_>, _>>()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { entries }));
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}
