//! The acceptor's HTTPS listener (rustls server): one certificate, HTTP/1.1 only.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
};

/// The server's certificate chain and an acceptor presenting it.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// The leaf certificate (DER): what a client's `tls-server-end-point` binding hashes.
    pub leaf: CertificateDer<'static>,
}

pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Tls> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .with_context(|| format!("reading the certificate {}", cert.display()))?;
    let leaf = chain
        .first()
        .cloned()
        .with_context(|| format!("no certificate in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the key {}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not go together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        leaf,
    })
}
