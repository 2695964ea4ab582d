//! Why a backend refused an Extended Protection login: the cleartext AV pairs of the client's
//! NTLMv2 Type3 (`MsvAvChannelBindings`, `MsvAvTargetName`, `MsvAvFlags`, read with
//! [`crate::ntlm`]) against what the gateway knows of the backend (plain HTTP or TLS, the leaf
//! certificate of its last handshake, its server name).
//!
//! The channel binding is `MD5(gss_channel_bindings_struct)` over `tls-server-end-point:` and the
//! hash of the certificate the client saw (RFC 5929); the gateway recomputes it for the backend's
//! certificate and says whether the client's login was bound to that one. The certificate's hash
//! is the one its signature uses (SHA-256, -384 or -512; SHA-256 for MD5/SHA-1): rather than parse
//! the certificate for it, all three are tried, which can only match the right one.
#![forbid(unsafe_code)]

use std::fmt;

use http::HeaderMap;

use crate::{
    metrics::EpaRefusal,
    ntlm::{ClientToken, Message, client_token},
};

const MSV_AV_FLAGS: u16 = 0x0006;
const MSV_AV_TARGET_NAME: u16 = 0x0009;
const MSV_AV_CHANNEL_BINDINGS: u16 = 0x000A;

/// What an NTLMv2 Type3 says in clear about Extended Protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingClaim {
    /// `MsvAvChannelBindings`: None when absent, all zero when the client had no channel.
    pub binding: Option<[u8; 16]>,
    /// `MsvAvTargetName`: the SPN the client authenticated to (`HTTP/host`).
    pub target_name: Option<String>,
    /// `MsvAvFlags` (0x2: a MIC is present; 0x4: the target name came from an untrusted source).
    pub flags: Option<u32>,
}

impl BindingClaim {
    /// The claim of a request's NTLMv2 Type3 (bare or in SPNEGO); None for anything else.
    pub fn from_headers(headers: &HeaderMap) -> Option<BindingClaim> {
        let Some(ClientToken::Ntlm(Message::Authenticate(type3))) = client_token(headers) else {
            return None;
        };
        let pairs = type3.ntlmv2_av_pairs?;
        let value = |id: u16| {
            pairs
                .iter()
                .find(|p| p.id == id)
                .map(|p| p.value.as_slice())
        };
        Some(BindingClaim {
            binding: value(MSV_AV_CHANNEL_BINDINGS).and_then(|v| v.try_into().ok()),
            target_name: value(MSV_AV_TARGET_NAME).map(utf16le),
            flags: value(MSV_AV_FLAGS)
                .and_then(|v| v.try_into().ok())
                .map(u32::from_le_bytes),
        })
    }

    /// A real binding (present and not all zero): the client bound its login to a TLS channel.
    pub fn is_bound(&self) -> bool {
        self.binding.is_some_and(|b| b.iter().any(|x| *x != 0))
    }

    fn binding_text(&self) -> &'static str {
        match self.binding {
            None => "absent",
            Some(_) if !self.is_bound() => "zero",
            Some(_) => "present",
        }
    }
}

impl fmt::Display for BindingClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channel binding {}, target name {}, flags {}",
            self.binding_text(),
            self.target_name.as_deref().unwrap_or("(none)"),
            self.flags
                .map_or_else(|| "(none)".to_string(), |v| format!("{v:#x}"))
        )
    }
}

fn utf16le(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// What the gateway knows of the backend that answered.
pub struct BackendView<'a> {
    /// `None`: plain HTTP.
    pub tls_server_name: Option<String>,
    /// The leaf certificate of the backend's last TLS handshake (DER).
    pub leaf: Option<&'a [u8]>,
}

/// The diagnosis of a 401 to a bound Type3: the cause and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub cause: EpaRefusal,
    pub advice: String,
}

/// Why a backend answering 401 to `claim` (a bound Type3) refused it, as far as can be told.
pub fn diagnose(claim: &BindingClaim, backend: &BackendView<'_>) -> Diagnosis {
    let Some(server_name) = &backend.tls_server_name else {
        return Diagnosis {
            cause: EpaRefusal::PlainBackend,
            advice:
                "the client bound its login to the gateway's TLS certificate, but this backend \
                     is reached over plain HTTP, where Extended Protection cannot match it \
                     (unsupported by Microsoft): write the backend https://HOST, install the \
                     listener's certificate on it and set epa_bridging = true"
                    .to_string(),
        };
    };
    if let (Some(leaf), Some(binding)) = (backend.leaf, claim.binding)
        && !binding_matches_certificate(&binding, leaf)
    {
        return Diagnosis {
            cause: EpaRefusal::CertificateDiffers,
            advice: format!(
                "the client's channel binding is for another certificate than the one backend \
                 ({server_name}) presents (sha256 {}): the client saw the gateway's certificate. \
                 Install the same certificate and key on the listener and the backend, and set \
                 epa_bridging = true to have it checked",
                super::tls::fingerprint(&leaf.to_vec().into())
            ),
        };
    }
    if backend.leaf.is_none() {
        return Diagnosis {
            cause: EpaRefusal::Other,
            advice: format!(
                "the backend's certificate ({server_name}) is not known yet, so the channel \
                 binding cannot be compared with it; run `ntlm-tag check` with epa_bridging = true"
            ),
        };
    }
    if let Some(spn) = &claim.target_name
        && !spn_names(spn, server_name)
    {
        return Diagnosis {
            cause: EpaRefusal::SpnMismatch,
            advice: format!(
                "the client authenticated to {spn}, the backend is known as {server_name}: add \
                 {spn} to the backend's Extended Protection SPN list, or publish the site under \
                 the backend's name"
            ),
        };
    }
    Diagnosis {
        cause: EpaRefusal::Other,
        advice: "the channel binding matches the backend's certificate and the SPN its name: \
                 the refusal is not Extended Protection's (password, account or policy)"
            .to_string(),
    }
}

/// `HTTP/host[:port]` names `server_name` (case-insensitive, port ignored).
fn spn_names(spn: &str, server_name: &str) -> bool {
    let host = spn.split_once('/').map_or(spn, |(_, h)| h);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    host.eq_ignore_ascii_case(server_name)
}

/// The client's binding is the `tls-server-end-point` of `leaf` under SHA-256, -384 or -512.
pub fn binding_matches_certificate(binding: &[u8; 16], leaf: &[u8]) -> bool {
    use ring::digest::{SHA256, SHA384, SHA512, digest};
    [&SHA256, &SHA384, &SHA512]
        .into_iter()
        .any(|alg| end_point_binding(digest(alg, leaf).as_ref()) == *binding)
}

/// MD5 of `gss_channel_bindings_struct` with empty addresses and `tls-server-end-point:<hash>`.
///
/// The binding is MD5 by definition (MS-NLMP 3.1.5.1.2) and ring has no MD5, hence `md-5`.
fn end_point_binding(cert_hash: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let prefix = b"tls-server-end-point:";
    let mut bindings = vec![0u8; 16];
    bindings.extend_from_slice(&((prefix.len() + cert_hash.len()) as u32).to_le_bytes());
    bindings.extend_from_slice(prefix);
    bindings.extend_from_slice(cert_hash);
    Md5::digest(&bindings).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(binding: Option<[u8; 16]>, spn: &str) -> BindingClaim {
        BindingClaim {
            binding,
            target_name: Some(spn.to_string()),
            flags: Some(2),
        }
    }

    #[test]
    fn causes_in_order_plain_certificate_spn_other() {
        let leaf = b"the backend's certificate".as_slice();
        let good = end_point_binding(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref());
        let tls = |leaf| BackendView {
            tls_server_name: Some("mail.corp.example".into()),
            leaf,
        };
        let plain = BackendView {
            tls_server_name: None,
            leaf: None,
        };
        let c = claim(Some(good), "HTTP/mail.corp.example");
        assert!(c.is_bound());
        assert_eq!(diagnose(&c, &plain).cause, EpaRefusal::PlainBackend);
        assert_eq!(
            diagnose(
                &claim(Some([7; 16]), "HTTP/mail.corp.example"),
                &tls(Some(leaf))
            )
            .cause,
            EpaRefusal::CertificateDiffers
        );
        assert_eq!(
            diagnose(&claim(Some(good), "HTTP/gw.corp.example"), &tls(Some(leaf))).cause,
            EpaRefusal::SpnMismatch
        );
        assert_eq!(
            diagnose(
                &claim(Some(good), "http/MAIL.corp.example:443"),
                &tls(Some(leaf))
            )
            .cause,
            EpaRefusal::Other
        );
        assert!(!claim(Some([0; 16]), "x").is_bound());
        assert!(!claim(None, "x").is_bound());
    }

    #[test]
    fn the_binding_of_a_known_certificate_hash() {
        // The same computation as pyspnego's and Windows' (RFC 2744 struct, MD5), checked on
        // SHA-384 too: only the hash that was used matches.
        let leaf = b"certificate".as_slice();
        let b384 = end_point_binding(ring::digest::digest(&ring::digest::SHA384, leaf).as_ref());
        assert!(binding_matches_certificate(&b384, leaf));
        assert!(!binding_matches_certificate(&b384, b"another"));
    }
}
