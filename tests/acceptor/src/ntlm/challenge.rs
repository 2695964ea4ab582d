//! CHALLENGE_MESSAGE (Type2), MS-NLMP 2.2.1.2.

use super::{TYPE_CHALLENGE, flags, wire};

/// The names the acceptor announces, as a member server of a domain would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNames {
    /// NetBIOS domain name; also the TargetName (TARGET_TYPE_DOMAIN).
    pub nb_domain: String,
    pub nb_computer: String,
    pub dns_domain: String,
    pub dns_computer: String,
}

impl ServerNames {
    /// NetBIOS names upper-cased; DNS names derived as `<domain>.test` and `<computer>.<domain>.test`.
    pub fn new(domain: &str, computer: &str) -> ServerNames {
        let dns_domain = format!("{}.test", domain.to_lowercase());
        ServerNames {
            nb_domain: domain.to_uppercase(),
            nb_computer: computer.to_uppercase(),
            dns_computer: format!("{}.{dns_domain}", computer.to_lowercase()),
            dns_domain,
        }
    }
}

/// The flags of every challenge: UNICODE (curl then sends UTF-16 names), NTLM, ALWAYS_SIGN,
/// TARGET_INFO (curl then sends an NTLMv2 response), EXTENDED_SESSIONSECURITY, 128, 56,
/// REQUEST_TARGET + TARGET_TYPE_DOMAIN with a target name, VERSION.
pub const CHALLENGE_FLAGS: u32 = flags::UNICODE
    | flags::REQUEST_TARGET
    | flags::NTLM
    | flags::ALWAYS_SIGN
    | flags::TARGET_TYPE_DOMAIN
    | flags::EXTENDED_SESSIONSECURITY
    | flags::TARGET_INFO
    | flags::VERSION
    | flags::NEGOTIATE_128
    | flags::NEGOTIATE_56;

/// AvId values (MS-NLMP 2.2.2.1).
mod av {
    pub const EOL: u16 = 0;
    pub const NB_COMPUTER_NAME: u16 = 1;
    pub const NB_DOMAIN_NAME: u16 = 2;
    pub const DNS_COMPUTER_NAME: u16 = 3;
    pub const DNS_DOMAIN_NAME: u16 = 4;
    pub const TIMESTAMP: u16 = 7;
}

/// Signature, type, TargetNameFields, flags, challenge, reserved, TargetInfoFields, Version.
const HEADER_LEN: usize = 56;
/// Windows 10 / Server 2019 (10.0.17763), NTLMSSP_REVISION_W2K3.
const VERSION: [u8; 8] = [10, 0, 0x63, 0x45, 0, 0, 0, 0x0f];
/// The longest name a challenge carries (a field is at most 64 KiB; names are far shorter).
const MAX_NAME_CHARS: usize = 255;

fn av_pair(out: &mut Vec<u8>, id: u16, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
}

fn name(s: &str) -> Vec<u8> {
    let s: String = s.chars().take(MAX_NAME_CHARS).collect();
    wire::utf16le(&s)
}

/// The TargetInfo AV pair list: NbDomainName, NbComputerName, DnsDomainName, DnsComputerName,
/// Timestamp, EOL.
pub fn target_info(names: &ServerNames, filetime: u64) -> Vec<u8> {
    let mut out = Vec::new();
    av_pair(&mut out, av::NB_DOMAIN_NAME, &name(&names.nb_domain));
    av_pair(&mut out, av::NB_COMPUTER_NAME, &name(&names.nb_computer));
    av_pair(&mut out, av::DNS_DOMAIN_NAME, &name(&names.dns_domain));
    av_pair(&mut out, av::DNS_COMPUTER_NAME, &name(&names.dns_computer));
    av_pair(&mut out, av::TIMESTAMP, &filetime.to_le_bytes());
    av_pair(&mut out, av::EOL, &[]);
    out
}

/// Builds a Type2 carrying `server_challenge`; `filetime` is the MsvAvTimestamp (100 ns units
/// since 1601-01-01 UTC).
pub fn build_challenge(names: &ServerNames, server_challenge: &[u8; 8], filetime: u64) -> Vec<u8> {
    let target_name = name(&names.nb_domain);
    let info = target_info(names, filetime);
    let mut out = Vec::with_capacity(HEADER_LEN + target_name.len() + info.len());
    out.extend_from_slice(wire::SIGNATURE);
    out.extend_from_slice(&TYPE_CHALLENGE.to_le_bytes());
    wire::put_field(&mut out, target_name.len(), HEADER_LEN);
    out.extend_from_slice(&CHALLENGE_FLAGS.to_le_bytes());
    out.extend_from_slice(server_challenge);
    out.extend_from_slice(&[0; 8]);
    wire::put_field(&mut out, info.len(), HEADER_LEN + target_name.len());
    out.extend_from_slice(&VERSION);
    out.extend_from_slice(&target_name);
    out.extend_from_slice(&info);
    out
}

/// Now as a FILETIME.
pub fn filetime_now() -> u64 {
    const UNIX_EPOCH_AS_FILETIME: u64 = 116_444_736_000_000_000;
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ticks = u64::try_from(since_unix.as_nanos() / 100).unwrap_or(u64::MAX);
    UNIX_EPOCH_AS_FILETIME.saturating_add(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntlm::NtlmError;

    fn names() -> ServerNames {
        ServerNames::new("Domain", "Server")
    }

    #[test]
    fn challenge_layout() -> Result<(), NtlmError> {
        let ch = [1, 2, 3, 4, 5, 6, 7, 8];
        let msg = build_challenge(&names(), &ch, 0x01d9_0000_0000_0000);
        assert_eq!(super::super::message_type(&msg)?, TYPE_CHALLENGE);
        assert_eq!(wire::u32_at(&msg, 20)?, CHALLENGE_FLAGS);
        assert_eq!(&msg[24..32], &ch);
        assert_eq!(
            wire::field(&msg, 12, "TargetName")?,
            wire::utf16le("DOMAIN")
        );
        let info = wire::field(&msg, 40, "TargetInfo")?;
        assert_eq!(info, target_info(&names(), 0x01d9_0000_0000_0000));
        Ok(())
    }

    #[test]
    fn target_info_pairs_in_order() -> Result<(), NtlmError> {
        let info = target_info(&names(), 42);
        let mut ids = Vec::new();
        let mut at = 0;
        loop {
            let id = wire::u16_at(&info, at)?;
            let len = usize::from(wire::u16_at(&info, at + 2)?);
            ids.push(id);
            if id == av::TIMESTAMP {
                assert_eq!(&info[at + 4..at + 4 + len], &42u64.to_le_bytes());
            }
            at += 4 + len;
            if id == av::EOL {
                break;
            }
        }
        assert_eq!(at, info.len());
        assert_eq!(ids, [2, 1, 4, 3, 7, 0]);
        Ok(())
    }

    #[test]
    fn names_are_derived() {
        let n = names();
        assert_eq!(n.nb_domain, "DOMAIN");
        assert_eq!(n.nb_computer, "SERVER");
        assert_eq!(n.dns_domain, "domain.test");
        assert_eq!(n.dns_computer, "server.domain.test");
    }
}
