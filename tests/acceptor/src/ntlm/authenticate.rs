//! AUTHENTICATE_MESSAGE (Type3), MS-NLMP 2.2.1.3.

use super::{NtlmError, TYPE_AUTHENTICATE, flags, wire};

/// Through NegotiateFlags; Version and MIC, when present, follow and are not needed here.
const MIN_LEN: usize = 64;

/// The parts of a Type3 the acceptor uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticate {
    pub flags: u32,
    pub lm_response: Vec<u8>,
    pub nt_response: Vec<u8>,
    pub domain: String,
    pub user: String,
    pub workstation: String,
}

impl Authenticate {
    /// Parses a Type3. Strings are UTF-16LE when the message's flags say UNICODE, else OEM.
    pub fn parse(buf: &[u8]) -> Result<Authenticate, NtlmError> {
        wire::expect(buf, TYPE_AUTHENTICATE, MIN_LEN)?;
        let lm = wire::field(buf, 12, "LmChallengeResponse")?;
        let nt = wire::field(buf, 20, "NtChallengeResponse")?;
        let domain = wire::field(buf, 28, "DomainName")?;
        let user = wire::field(buf, 36, "UserName")?;
        let workstation = wire::field(buf, 44, "Workstation")?;
        wire::field(buf, 52, "EncryptedRandomSessionKey")?;
        let flags = wire::u32_at(buf, 60)?;
        let unicode = flags & flags::UNICODE != 0;
        Ok(Authenticate {
            flags,
            lm_response: lm.to_vec(),
            nt_response: nt.to_vec(),
            domain: wire::string(domain, unicode, "DomainName")?,
            user: wire::string(user, unicode, "UserName")?,
            workstation: wire::string(workstation, unicode, "Workstation")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntlm::samples::ms_nlmp_4_2_4_3;

    #[test]
    fn parses_the_ms_nlmp_example() -> Result<(), NtlmError> {
        let msg = ms_nlmp_4_2_4_3();
        assert_eq!(msg.len(), 0xe8);
        let a = Authenticate::parse(&msg)?;
        assert_eq!(a.flags, 0xe288_8235);
        assert_eq!(a.user, "User");
        assert_eq!(a.domain, "Domain");
        assert_eq!(a.workstation, "COMPUTER");
        assert_eq!(a.lm_response.len(), 24);
        assert_eq!(a.nt_response.len(), 84);
        assert_eq!(
            &a.nt_response[..4],
            &[0x68, 0xcd, 0x0a, 0xb8],
            "NtChallengeResponse starts with NTProofStr"
        );
        Ok(())
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let msg = ms_nlmp_4_2_4_3();
        for len in 0..msg.len() {
            assert!(Authenticate::parse(&msg[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn hostile_fields_are_errors() {
        let msg = ms_nlmp_4_2_4_3();
        // Every security buffer in turn: huge length, huge offset, offset at the very end.
        for at in [12, 20, 28, 36, 44, 52] {
            for (len, offset) in [(0xffffu16, 0x48u32), (8, u32::MAX), (8, 0xe4)] {
                let mut m = msg.clone();
                m[at..at + 2].copy_from_slice(&len.to_le_bytes());
                m[at + 4..at + 8].copy_from_slice(&offset.to_le_bytes());
                assert!(
                    matches!(
                        Authenticate::parse(&m),
                        Err(NtlmError::FieldOutOfBounds { .. })
                    ),
                    "field at {at}, len {len}, offset {offset:#x}"
                );
            }
        }
        // Odd-length UTF-16 user name.
        let mut m = msg.clone();
        m[36..38].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(
            Authenticate::parse(&m),
            Err(NtlmError::BadUnicode { field: "UserName" })
        );
        // A Type1 or Type2 is not a Type3; neither is random text.
        let mut m = msg.clone();
        m[8] = 1;
        assert!(matches!(
            Authenticate::parse(&m),
            Err(NtlmError::WrongType { .. })
        ));
        assert!(Authenticate::parse(&[0xff; 200]).is_err());
    }

    #[test]
    fn oem_strings_without_unicode_flag() -> Result<(), NtlmError> {
        let mut m = ms_nlmp_4_2_4_3();
        m[60] &= !0x01;
        let a = Authenticate::parse(&m)?;
        assert_eq!(a.user, "U\0s\0e\0r\0");
        Ok(())
    }
}
