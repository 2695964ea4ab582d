//! NTOWFv2 and the NTLMv2 response check (MS-NLMP 3.3.2).
//!
//! NT hash     = MD4(UTF16LE(password))
//! NTOWFv2     = HMAC_MD5(NT hash, UTF16LE(UPPER(user) + domain))
//! NTProofStr  = HMAC_MD5(NTOWFv2, ServerChallenge || blob)
//! where the client's NtChallengeResponse is NTProofStr || blob.

use hmac::{Hmac, Mac};
use md4::{Digest, Md4};
use md5::Md5;

use super::wire::utf16le;

type HmacMd5 = Hmac<Md5>;

/// NTProofStr length.
pub const PROOF_LEN: usize = 16;
/// The fixed part of an NTLMv2 blob: RespType, HiRespType, Reserved1/2, TimeStamp,
/// ChallengeFromClient, Reserved3.
pub const BLOB_HEADER_LEN: usize = 28;

/// Why an NtChallengeResponse is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("NtChallengeResponse of {0} bytes is not NTLMv2 (NTLMv1/LM are not accepted)")]
    NotNtlmV2(usize),
    #[error("NTLMv2 response does not match the password (NTProofStr mismatch)")]
    ProofMismatch,
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> HmacMd5 {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = <HmacMd5 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// MD4 of the UTF-16LE password.
pub fn nt_hash(password: &str) -> [u8; 16] {
    Md4::digest(utf16le(password)).into()
}

/// NTOWFv2 from the NT hash and the user and domain *as the client sent them*.
pub fn ntowfv2(nt_hash: &[u8; 16], user: &str, domain: &str) -> [u8; 16] {
    let identity = utf16le(&format!("{}{domain}", user.to_uppercase()));
    hmac_md5(nt_hash, &[&identity])
        .finalize()
        .into_bytes()
        .into()
}

/// NTProofStr for `blob` under `server_challenge` (what a client computes).
pub fn nt_proof_str(ntowfv2: &[u8; 16], server_challenge: &[u8; 8], blob: &[u8]) -> [u8; 16] {
    hmac_md5(ntowfv2, &[server_challenge, blob])
        .finalize()
        .into_bytes()
        .into()
}

/// Checks an NTLMv2 NtChallengeResponse (NTProofStr || blob) in constant time.
pub fn verify_ntlmv2(
    ntowfv2: &[u8; 16],
    server_challenge: &[u8; 8],
    nt_response: &[u8],
) -> Result<(), ResponseError> {
    if nt_response.len() < PROOF_LEN + BLOB_HEADER_LEN {
        return Err(ResponseError::NotNtlmV2(nt_response.len()));
    }
    let (proof, blob) = nt_response.split_at(PROOF_LEN);
    hmac_md5(ntowfv2, &[server_challenge, blob])
        .verify_slice(proof)
        .map_err(|_| ResponseError::ProofMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntlm::{Authenticate, NtlmError, samples::ms_nlmp_4_2_4_3};

    const SERVER_CHALLENGE: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];

    #[test]
    fn ms_nlmp_4_2_4_ntowfv2_and_proof() {
        // MS-NLMP 4.2.4.1.1 / 4.2.4.2.2.
        let key = ntowfv2(&nt_hash("Password"), "User", "Domain");
        assert_eq!(
            key,
            [
                0x0c, 0x86, 0x8a, 0x40, 0x3b, 0xfd, 0x7a, 0x93, 0xa3, 0x00, 0x1e, 0xf2, 0x2e, 0xf0,
                0x2e, 0x3f
            ]
        );
        // temp = 0x0101, Z(6), Time = 0, ClientChallenge = aa*8, Z(4), TargetInfo, Z(4).
        let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
        blob.extend_from_slice(&[0; 8]);
        blob.extend_from_slice(&[0xaa; 8]);
        blob.extend_from_slice(&[0; 4]);
        for (id, name) in [(2u16, "Domain"), (1, "Server")] {
            blob.extend_from_slice(&id.to_le_bytes());
            blob.extend_from_slice(&12u16.to_le_bytes());
            blob.extend_from_slice(&utf16le(name));
        }
        blob.extend_from_slice(&[0; 4]);
        blob.extend_from_slice(&[0; 4]);
        assert_eq!(
            nt_proof_str(&key, &SERVER_CHALLENGE, &blob),
            [
                0x68, 0xcd, 0x0a, 0xb8, 0x51, 0xe5, 0x1c, 0x96, 0xaa, 0xbc, 0x92, 0x7b, 0xeb, 0xef,
                0x6a, 0x1c
            ]
        );
    }

    #[test]
    fn verifies_the_ms_nlmp_authenticate_message() -> Result<(), NtlmError> {
        let a = Authenticate::parse(&ms_nlmp_4_2_4_3())?;
        let right = ntowfv2(&nt_hash("Password"), &a.user, &a.domain);
        assert_eq!(
            verify_ntlmv2(&right, &SERVER_CHALLENGE, &a.nt_response),
            Ok(())
        );
        // The user name is case-insensitive, the password is not.
        let upper = ntowfv2(&nt_hash("Password"), "USER", &a.domain);
        assert_eq!(
            verify_ntlmv2(&upper, &SERVER_CHALLENGE, &a.nt_response),
            Ok(())
        );
        let wrong = ntowfv2(&nt_hash("password"), &a.user, &a.domain);
        assert_eq!(
            verify_ntlmv2(&wrong, &SERVER_CHALLENGE, &a.nt_response),
            Err(ResponseError::ProofMismatch)
        );
        // Another domain, another challenge, a flipped blob bit: all refused.
        let other_domain = ntowfv2(&nt_hash("Password"), &a.user, "Other");
        assert!(verify_ntlmv2(&other_domain, &SERVER_CHALLENGE, &a.nt_response).is_err());
        let mut other_challenge = SERVER_CHALLENGE;
        other_challenge[7] ^= 1;
        assert!(verify_ntlmv2(&right, &other_challenge, &a.nt_response).is_err());
        let mut tampered = a.nt_response.clone();
        tampered[40] ^= 0x80;
        assert!(verify_ntlmv2(&right, &SERVER_CHALLENGE, &tampered).is_err());
        Ok(())
    }

    #[test]
    fn short_responses_are_not_ntlmv2() {
        let key = ntowfv2(&nt_hash("Password"), "User", "Domain");
        // 24 bytes is an NTLMv1 response.
        for len in [0, 1, 16, 24, PROOF_LEN + BLOB_HEADER_LEN - 1] {
            assert_eq!(
                verify_ntlmv2(&key, &SERVER_CHALLENGE, &vec![0; len]),
                Err(ResponseError::NotNtlmV2(len))
            );
        }
    }
}
