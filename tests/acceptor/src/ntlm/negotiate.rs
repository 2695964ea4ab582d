//! NEGOTIATE_MESSAGE (Type1), MS-NLMP 2.2.1.1.

use super::{NtlmError, TYPE_NEGOTIATE, wire};

/// Signature, MessageType, NegotiateFlags.
const MIN_LEN: usize = 16;
/// ... plus DomainNameFields and WorkstationFields.
const FIELDS_LEN: usize = 32;

/// What the acceptor keeps of a Type1: only the client's flags (the challenge does not depend on
/// them beyond what curl and Windows accept anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    pub flags: u32,
}

impl Negotiate {
    /// Parses a Type1. Older clients send only the 16-byte prefix; when the domain and workstation
    /// fields are present they must point inside the message.
    pub fn parse(buf: &[u8]) -> Result<Negotiate, NtlmError> {
        wire::expect(buf, TYPE_NEGOTIATE, MIN_LEN)?;
        let flags = wire::u32_at(buf, 12)?;
        if buf.len() >= FIELDS_LEN {
            wire::field(buf, 16, "DomainName")?;
            wire::field(buf, 24, "Workstation")?;
        }
        Ok(Negotiate { flags })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What curl 7.88 sends for `--ntlm` (OEM, REQUEST_TARGET, NTLM, ALWAYS_SIGN,
    /// EXTENDED_SESSIONSECURITY; empty domain and workstation).
    const CURL_TYPE1: &[u8] = b"NTLMSSP\0\x01\0\0\0\x06\x82\x08\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

    #[test]
    fn parses_curls_type1() {
        assert_eq!(
            Negotiate::parse(CURL_TYPE1),
            Ok(Negotiate { flags: 0x0008_8206 })
        );
    }

    #[test]
    fn accepts_the_short_form() {
        assert!(Negotiate::parse(&CURL_TYPE1[..16]).is_ok());
    }

    #[test]
    fn rejects_truncated_garbage_and_wrong_types() {
        for len in 0..16 {
            assert!(Negotiate::parse(&CURL_TYPE1[..len]).is_err(), "len {len}");
        }
        assert_eq!(
            Negotiate::parse(b"NTLMSSX\0\x01\0\0\0\0\0\0\0"),
            Err(NtlmError::BadSignature)
        );
        assert_eq!(
            Negotiate::parse(b"NTLMSSP\0\x03\0\0\0\0\0\0\0"),
            Err(NtlmError::WrongType {
                expected: 1,
                got: 3
            })
        );
        assert!(Negotiate::parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn rejects_a_domain_field_pointing_outside() {
        let mut msg = CURL_TYPE1.to_vec();
        msg[16..18].copy_from_slice(&8u16.to_le_bytes());
        msg[20..24].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert_eq!(
            Negotiate::parse(&msg),
            Err(NtlmError::FieldOutOfBounds {
                field: "DomainName"
            })
        );
    }
}
