//! The client side of NTLMv2, enough for a login: the NEGOTIATE_MESSAGE curl sends, and an
//! AUTHENTICATE_MESSAGE whose NTLMv2 response answers a CHALLENGE_MESSAGE. The bench's load
//! generator logs in with it and the acceptor's tests build their messages with it, on the same
//! crypto the acceptor verifies with.
//!
//! blob                 = 0x0101 0000 00000000 | timestamp | client challenge | 00000000 | target info | 00000000
//! NtChallengeResponse  = HMAC_MD5(NTOWFv2, server challenge || blob) || blob

use super::{NtlmError, TYPE_AUTHENTICATE, TYPE_CHALLENGE, crypto, flags, wire};

/// What curl sends: OEM, REQUEST_TARGET, NTLM, ALWAYS_SIGN, EXTENDED_SESSIONSECURITY, no domain
/// or workstation.
pub const NEGOTIATE: &[u8; 32] =
    b"NTLMSSP\0\x01\0\0\0\x06\x82\x08\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// UNICODE (the names are UTF-16LE), REQUEST_TARGET, NTLM, ALWAYS_SIGN, EXTENDED_SESSIONSECURITY,
/// TARGET_INFO, 128, 56.
pub const AUTHENTICATE_FLAGS: u32 = flags::UNICODE
    | flags::REQUEST_TARGET
    | flags::NTLM
    | flags::ALWAYS_SIGN
    | flags::EXTENDED_SESSIONSECURITY
    | flags::TARGET_INFO
    | flags::NEGOTIATE_128
    | flags::NEGOTIATE_56;

/// An AUTHENTICATE_MESSAGE without Version and MIC: the payload starts right after the flags.
const AUTHENTICATE_HEADER_LEN: usize = 64;
/// A CHALLENGE_MESSAGE through its TargetInfoFields.
const CHALLENGE_MIN_LEN: usize = 48;

/// A user, the domain it names, and its NTOWFv2 computed once.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub domain: String,
    ntowfv2: [u8; 16],
}

impl Credentials {
    pub fn new(user: &str, domain: &str, password: &str) -> Credentials {
        Credentials {
            user: user.to_string(),
            domain: domain.to_string(),
            ntowfv2: crypto::ntowfv2(&crypto::nt_hash(password), user, domain),
        }
    }

    /// NTProofStr || blob, for `server_challenge`.
    pub fn nt_response(&self, server_challenge: &[u8; 8], blob: &[u8]) -> Vec<u8> {
        let proof = crypto::nt_proof_str(&self.ntowfv2, server_challenge, blob);
        [proof.as_slice(), blob].concat()
    }
}

/// What a client reads of a CHALLENGE_MESSAGE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge<'a> {
    pub server_challenge: [u8; 8],
    pub target_info: &'a [u8],
}

impl<'a> Challenge<'a> {
    pub fn parse(msg: &'a [u8]) -> Result<Challenge<'a>, NtlmError> {
        wire::expect(msg, TYPE_CHALLENGE, CHALLENGE_MIN_LEN)?;
        let mut server_challenge = [0u8; 8];
        server_challenge.copy_from_slice(&msg[24..32]);
        Ok(Challenge {
            server_challenge,
            target_info: wire::field(msg, 40, "TargetInfo")?,
        })
    }
}

/// The NTLMv2 blob the client's response covers.
pub fn blob(client_challenge: [u8; 8], filetime: u64, target_info: &[u8]) -> Vec<u8> {
    let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
    blob.extend_from_slice(&filetime.to_le_bytes());
    blob.extend_from_slice(&client_challenge);
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(target_info);
    blob.extend_from_slice(&[0; 4]);
    blob
}

/// An AUTHENTICATE_MESSAGE carrying `nt_response` for `creds`, names in UTF-16LE.
pub fn authenticate(creds: &Credentials, workstation: &str, nt_response: &[u8]) -> Vec<u8> {
    let fields = [
        vec![0u8; 24], // LmChallengeResponse: unused with NTLMv2 + target info
        nt_response.to_vec(),
        wire::utf16le(&creds.domain),
        wire::utf16le(&creds.user),
        wire::utf16le(workstation),
        Vec::new(), // EncryptedRandomSessionKey
    ];
    let mut msg = wire::SIGNATURE.to_vec();
    msg.extend_from_slice(&TYPE_AUTHENTICATE.to_le_bytes());
    let mut at = AUTHENTICATE_HEADER_LEN;
    for f in &fields {
        wire::put_field(&mut msg, f.len(), at);
        at += f.len();
    }
    msg.extend_from_slice(&AUTHENTICATE_FLAGS.to_le_bytes());
    for f in &fields {
        msg.extend_from_slice(f);
    }
    msg
}

/// The AUTHENTICATE_MESSAGE answering the CHALLENGE_MESSAGE `type2`.
pub fn answer(
    creds: &Credentials,
    workstation: &str,
    type2: &[u8],
    client_challenge: [u8; 8],
    filetime: u64,
) -> Result<Vec<u8>, NtlmError> {
    let challenge = Challenge::parse(type2)?;
    let blob = blob(client_challenge, filetime, challenge.target_info);
    let nt = creds.nt_response(&challenge.server_challenge, &blob);
    Ok(authenticate(creds, workstation, &nt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntlm::{Authenticate, ServerNames, build_challenge, samples::ms_nlmp_4_2_4_3};

    /// MS-NLMP 4.2.4: the sample's NTLMv2 response, rebuilt from its parts.
    #[test]
    fn rebuilds_the_ms_nlmp_ntlmv2_response() -> Result<(), NtlmError> {
        let sample = Authenticate::parse(&ms_nlmp_4_2_4_3())?;
        let target_info = &sample.nt_response[16 + 28..sample.nt_response.len() - 4];
        let creds = Credentials::new("User", "Domain", "Password");
        let nt = creds.nt_response(
            &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],
            &blob([0xaa; 8], 0, target_info),
        );
        assert_eq!(nt, sample.nt_response);
        Ok(())
    }

    #[test]
    fn answers_the_acceptors_challenge_with_a_message_it_parses() -> Result<(), NtlmError> {
        let server_challenge = [1, 2, 3, 4, 5, 6, 7, 8];
        let type2 = build_challenge(&ServerNames::new("D", "S"), &server_challenge, 42);
        let creds = Credentials::new("bench00", "NTLMTAG", "pw");
        let type3 = answer(&creds, "BENCH", &type2, [9; 8], 42)?;
        let a = Authenticate::parse(&type3)?;
        assert_eq!(
            (a.user.as_str(), a.domain.as_str(), a.workstation.as_str()),
            ("bench00", "NTLMTAG", "BENCH")
        );
        assert_eq!(a.flags, AUTHENTICATE_FLAGS);
        let key = crypto::ntowfv2(&crypto::nt_hash("pw"), "bench00", "NTLMTAG");
        assert_eq!(
            crypto::verify_ntlmv2(&key, &server_challenge, &a.nt_response),
            Ok(())
        );
        let info = Challenge::parse(&type2)?.target_info;
        assert_eq!(&a.nt_response[16 + 28..16 + 28 + info.len()], info);
        Ok(())
    }

    #[test]
    fn a_truncated_challenge_is_an_error() {
        let type2 = build_challenge(&ServerNames::new("D", "S"), &[0; 8], 0);
        for len in 0..CHALLENGE_MIN_LEN {
            assert!(Challenge::parse(&type2[..len]).is_err(), "len {len}");
        }
        assert!(Challenge::parse(NEGOTIATE).is_err(), "a Type1 is no Type2");
    }
}
