//! Extended Protection: the channel binding inside an NTLMv2 response (MS-NLMP 2.2.2.1,
//! `MsvAvChannelBindings`), checked against this server's own TLS certificate the way IIS with
//! `tokenChecking="Require"` does.
//!
//! The client hashes `gss_channel_bindings_struct` (RFC 2744 §3.11: initiator and acceptor
//! address type and address, all empty, then the application data) with MD5, where the
//! application data is `tls-server-end-point:` followed by the hash of the server's leaf
//! certificate (RFC 5929 §4.1). The AV pairs are covered by NTProofStr, so they are checked after
//! the response itself.

use md5::{Digest, Md5};
use sha2::Sha256;

use super::{NtlmError, crypto};

/// MsvAvEOL, MsvAvFlags, MsvAvChannelBindings, MsvAvTargetName.
const AV_EOL: u16 = 0x0000;
const AV_CHANNEL_BINDINGS: u16 = 0x000A;

/// Why a response's channel binding is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error(
        "no channel binding (MsvAvChannelBindings absent): the client logged in without TLS or without Extended Protection"
    )]
    Absent,
    #[error("an all-zero channel binding: the client had no TLS channel to bind to")]
    Zero,
    #[error(
        "the channel binding does not match this server's certificate (tls-server-end-point): the client saw another certificate"
    )]
    Mismatch,
}

/// The 16-byte MsvAvChannelBindings a client computes for a server presenting `leaf` (DER),
/// whose signature uses SHA-256 (RFC 5929 maps MD5 and SHA-1 signatures to SHA-256 too).
pub fn expected_for_certificate(leaf: &[u8]) -> [u8; 16] {
    let mut application_data = b"tls-server-end-point:".to_vec();
    application_data.extend_from_slice(&Sha256::digest(leaf));
    let mut bindings = vec![0u8; 16];
    bindings.extend_from_slice(&(application_data.len() as u32).to_le_bytes());
    bindings.extend_from_slice(&application_data);
    Md5::digest(&bindings).into()
}

/// The AV pairs of an NTLMv2 NtChallengeResponse (NTProofStr || blob; they follow the blob's
/// fixed header), as (AvId, value) up to MsvAvEOL.
pub fn av_pairs(nt_response: &[u8]) -> Result<Vec<(u16, &[u8])>, NtlmError> {
    let field = "NTLMv2 AV pairs";
    let mut rest = nt_response
        .get(crypto::PROOF_LEN + crypto::BLOB_HEADER_LEN..)
        .ok_or(NtlmError::FieldOutOfBounds { field })?;
    let mut pairs = Vec::new();
    loop {
        let (head, tail) = rest
            .split_at_checked(4)
            .ok_or(NtlmError::FieldOutOfBounds { field })?;
        let id = u16::from_le_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        if id == AV_EOL {
            return Ok(pairs);
        }
        let (value, tail) = tail
            .split_at_checked(len)
            .ok_or(NtlmError::FieldOutOfBounds { field })?;
        pairs.push((id, value));
        rest = tail;
    }
}

/// Checks the response's channel binding against `expected`.
pub fn check(expected: &[u8; 16], nt_response: &[u8]) -> Result<(), BindingError> {
    let pairs = av_pairs(nt_response).map_err(|_| BindingError::Absent)?;
    let binding = pairs
        .iter()
        .find(|(id, _)| *id == AV_CHANNEL_BINDINGS)
        .map(|(_, v)| *v)
        .ok_or(BindingError::Absent)?;
    if binding.iter().all(|b| *b == 0) {
        return Err(BindingError::Zero);
    }
    if binding == expected {
        Ok(())
    } else {
        Err(BindingError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_with(pairs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut r = vec![0u8; crypto::PROOF_LEN + crypto::BLOB_HEADER_LEN];
        for (id, value) in pairs {
            r.extend_from_slice(&id.to_le_bytes());
            r.extend_from_slice(&(value.len() as u16).to_le_bytes());
            r.extend_from_slice(value);
        }
        r.extend_from_slice(&[0; 4]);
        r
    }

    #[test]
    fn absent_zero_mismatch_and_match() {
        let expected = expected_for_certificate(b"a certificate");
        assert_eq!(
            check(&expected, &response_with(&[(0x0001, b"x")])),
            Err(BindingError::Absent)
        );
        assert_eq!(
            check(
                &expected,
                &response_with(&[(AV_CHANNEL_BINDINGS, &[0; 16])])
            ),
            Err(BindingError::Zero)
        );
        let other = expected_for_certificate(b"another certificate");
        assert_eq!(
            check(&expected, &response_with(&[(AV_CHANNEL_BINDINGS, &other)])),
            Err(BindingError::Mismatch)
        );
        assert_eq!(
            check(
                &expected,
                &response_with(&[(0x0009, b"H\0"), (AV_CHANNEL_BINDINGS, &expected)])
            ),
            Ok(())
        );
    }

    #[test]
    fn truncated_pairs_are_errors() {
        let r = response_with(&[(AV_CHANNEL_BINDINGS, &[1; 16])]);
        for len in 0..r.len() {
            assert!(av_pairs(&r[..len]).is_err(), "len {len}");
        }
    }
}
