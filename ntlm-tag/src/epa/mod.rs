//! Extended Protection for Authentication (EPA) through the gateway.
//!
//! A client that logs in over TLS binds its NTLM/Kerberos authentication to the certificate it
//! saw: the `tls-server-end-point` channel binding (RFC 5929) is a hash of the server's leaf
//! certificate, carried inside the NTLMv2 response (`MsvAvChannelBindings`). A backend with
//! Extended Protection (Exchange, IIS with `tokenChecking="Require"`, AD FS) compares it with the
//! hash of *its own* certificate. Through a gateway that re-encrypts, both legs agree only when the
//! gateway's listener and the backend present the same leaf certificate (TLS bridging, the one
//! set-up Microsoft supports); offloading to plain HTTP cannot work.
//!
//! [`bridging`] checks that set-up at start-up, on reload and in `ntlm-tag check`.
#![forbid(unsafe_code)]

pub mod bridging;
pub mod diagnosis;

use tokio_rustls::rustls::pki_types::CertificateDer;

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
}
