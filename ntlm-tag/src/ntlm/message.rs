//! NTLM messages (MS-NLMP §2.2.1): Type1 (NEGOTIATE), Type2 (CHALLENGE), Type3 (AUTHENTICATE).
//!
//! Pure functions over bytes, for hostile input: every field is bounds-checked, nothing panics,
//! nothing is decrypted or verified. Type3 is read from its cleartext fields only (domain, user,
//! workstation, flags, and the AV pairs that an NTLMv2 response carries in clear).
#![forbid(unsafe_code)]

use thiserror::Error;

/// `NTLMSSP\0`, the first eight bytes of every NTLM message.
pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

/// NTLMSSP_NEGOTIATE_UNICODE: strings are UTF-16LE (else the OEM code page).
pub const NEGOTIATE_UNICODE: u32 = 0x0000_0001;

/// Longest string field read from a message (domain, user, workstation, target name). Real names
/// are far shorter (AD allows 256 characters); more is not a name.
const MAX_STRING_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    #[error("not an NTLM message (no NTLMSSP signature)")]
    NoSignature,
    #[error("NTLM message truncated: {0} bytes")]
    Truncated(usize),
    #[error("unknown NTLM message type {0}")]
    UnknownType(u32),
    #[error("NTLM {field} field points outside the message")]
    FieldOutOfBounds { field: &'static str },
    #[error("NTLM {field} field is longer than {MAX_STRING_BYTES} bytes")]
    FieldTooLong { field: &'static str },
}

/// One parsed NTLM message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Negotiate(Negotiate),
    Challenge(Challenge),
    Authenticate(Authenticate),
}

impl Message {
    /// `negotiate`, `challenge` or `authenticate`.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Negotiate(_) => "negotiate",
            Message::Challenge(_) => "challenge",
            Message::Authenticate(_) => "authenticate",
        }
    }
}

/// Type1: what the client offers. Domain and workstation are optional (OEM strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    pub flags: u32,
    pub domain: String,
    pub workstation: String,
}

/// Type2: the server's challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub flags: u32,
    pub target_name: String,
    pub server_challenge: [u8; 8],
    pub target_info: Vec<AvPair>,
}

/// Type3: who the client says it is. The credentials themselves are not checked here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticate {
    pub flags: u32,
    pub domain: String,
    pub user: String,
    pub workstation: String,
    /// The AV pairs of an NTLMv2 response (channel bindings, target name, timestamp, flags);
    /// `None` for an NTLMv1 (24-byte) or anonymous (empty) response.
    pub ntlmv2_av_pairs: Option<Vec<AvPair>>,
}

impl Authenticate {
    /// An anonymous Type3: empty user and empty responses (MS-NLMP §3.2.5.1.2).
    pub fn is_anonymous(&self) -> bool {
        self.user.is_empty()
    }

    /// `DOMAIN\user`, or `user` without a domain.
    pub fn account(&self) -> String {
        if self.domain.is_empty() {
            self.user.clone()
        } else {
            format!("{}\\{}", self.domain, self.user)
        }
    }
}

/// One AV pair (MS-NLMP §2.2.2.1), `MsvAvEOL` excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvPair {
    pub id: u16,
    pub value: Vec<u8>,
}

/// Parses one NTLM message; trailing bytes after the fields it points to are ignored.
pub fn parse(bytes: &[u8]) -> Result<Message, MessageError> {
    if bytes.len() < 12 {
        return Err(
            if !bytes.is_empty() && SIGNATURE.starts_with(&bytes[..bytes.len().min(8)]) {
                MessageError::Truncated(bytes.len())
            } else {
                MessageError::NoSignature
            },
        );
    }
    if &bytes[..8] != SIGNATURE {
        return Err(MessageError::NoSignature);
    }
    match u32_at(bytes, 8)? {
        1 => parse_negotiate(bytes).map(Message::Negotiate),
        2 => parse_challenge(bytes).map(Message::Challenge),
        3 => parse_authenticate(bytes).map(Message::Authenticate),
        other => Err(MessageError::UnknownType(other)),
    }
}

fn parse_negotiate(b: &[u8]) -> Result<Negotiate, MessageError> {
    let flags = u32_at(b, 12)?;
    // Type1 from old clients ends after the flags; the domain and workstation fields are optional.
    let oem = |at, field| match field_at(b, at, field) {
        Ok(bytes) => oem_string(bytes, field),
        Err(MessageError::Truncated(_)) => Ok(String::new()),
        Err(e) => Err(e),
    };
    Ok(Negotiate {
        flags,
        domain: oem(16, "domain")?,
        workstation: oem(24, "workstation")?,
    })
}

fn parse_challenge(b: &[u8]) -> Result<Challenge, MessageError> {
    let flags = u32_at(b, 20)?;
    let target_name = string(field_at(b, 12, "target name")?, flags, "target name")?;
    let mut server_challenge = [0; 8];
    server_challenge.copy_from_slice(slice(b, 24, 8)?);
    // Target info (offset 40) is absent in the shortest, oldest form of the message.
    let target_info = match field_at(b, 40, "target info") {
        Ok(info) => av_pairs(info),
        Err(MessageError::Truncated(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(Challenge {
        flags,
        target_name,
        server_challenge,
        target_info,
    })
}

fn parse_authenticate(b: &[u8]) -> Result<Authenticate, MessageError> {
    let nt_response = field_at(b, 20, "NT response")?;
    let domain_bytes = field_at(b, 28, "domain")?;
    let user_bytes = field_at(b, 36, "user")?;
    let workstation_bytes = field_at(b, 44, "workstation")?;
    let flags = u32_at(b, 60)?;
    // An NTLMv2 response is NTProofStr (16) + a blob whose AV pairs start 28 bytes in; NTLMv1
    // responses are exactly 24 bytes.
    let ntlmv2_av_pairs = (nt_response.len() > 24)
        .then(|| nt_response.get(16 + 28..).map(av_pairs))
        .flatten();
    Ok(Authenticate {
        flags,
        domain: string(domain_bytes, flags, "domain")?,
        user: string(user_bytes, flags, "user")?,
        workstation: string(workstation_bytes, flags, "workstation")?,
        ntlmv2_av_pairs,
    })
}

/// AV pairs up to `MsvAvEOL` or the end of the bytes; a pair running past the end ends the list.
fn av_pairs(mut b: &[u8]) -> Vec<AvPair> {
    let mut pairs = Vec::new();
    while b.len() >= 4 {
        let id = u16::from_le_bytes([b[0], b[1]]);
        let len = usize::from(u16::from_le_bytes([b[2], b[3]]));
        if id == 0 {
            break;
        }
        let Some(value) = b.get(4..4 + len) else {
            break;
        };
        pairs.push(AvPair {
            id,
            value: value.to_vec(),
        });
        b = &b[4 + len..];
    }
    pairs
}

/// The bytes a `(len u16, max_len u16, offset u32)` field at `at` points to.
fn field_at<'a>(b: &'a [u8], at: usize, field: &'static str) -> Result<&'a [u8], MessageError> {
    let header = slice(b, at, 8)?;
    let len = usize::from(u16::from_le_bytes([header[0], header[1]]));
    let offset = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len == 0 {
        return Ok(&[]);
    }
    offset
        .checked_add(len)
        .and_then(|end| b.get(offset..end))
        .ok_or(MessageError::FieldOutOfBounds { field })
}

fn string(bytes: &[u8], flags: u32, field: &'static str) -> Result<String, MessageError> {
    if flags & NEGOTIATE_UNICODE == 0 {
        return oem_string(bytes, field);
    }
    if bytes.len() > MAX_STRING_BYTES {
        return Err(MessageError::FieldTooLong { field });
    }
    let units = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]));
    Ok(char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect())
}

/// OEM strings: the client's code page, unknown here; ASCII is what matters for names, anything
/// else is shown as U+FFFD rather than guessed.
fn oem_string(bytes: &[u8], field: &'static str) -> Result<String, MessageError> {
    if bytes.len() > MAX_STRING_BYTES {
        return Err(MessageError::FieldTooLong { field });
    }
    Ok(bytes
        .iter()
        .map(|&b| {
            if b.is_ascii() {
                char::from(b)
            } else {
                char::REPLACEMENT_CHARACTER
            }
        })
        .collect())
}

fn slice(b: &[u8], at: usize, len: usize) -> Result<&[u8], MessageError> {
    b.get(at..at + len).ok_or(MessageError::Truncated(b.len()))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, MessageError> {
    let s = slice(b, at, 4)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    /// A Type3 with the given names and NT response (Unicode), as a client would send it.
    pub(crate) fn type3(domain: &str, user: &str, workstation: &str, nt: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(SIGNATURE);
        m.extend_from_slice(&3u32.to_le_bytes());
        let payload: Vec<Vec<u8>> = vec![
            vec![0; 24],
            nt.to_vec(),
            utf16(domain),
            utf16(user),
            utf16(workstation),
            vec![],
        ];
        let mut offset = 64 + 8;
        for p in &payload {
            m.extend_from_slice(&(p.len() as u16).to_le_bytes());
            m.extend_from_slice(&(p.len() as u16).to_le_bytes());
            m.extend_from_slice(&(offset as u32).to_le_bytes());
            offset += p.len();
        }
        m.extend_from_slice(&(NEGOTIATE_UNICODE | 0x0008_8200).to_le_bytes());
        m.extend_from_slice(&[0; 8]); // version
        for p in payload {
            m.extend_from_slice(&p);
        }
        m
    }

    fn ntlmv2_response(pairs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut r = vec![0xaa; 16];
        r.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
        r.extend_from_slice(&[0; 8]); // timestamp
        r.extend_from_slice(&[0; 8]); // client challenge
        r.extend_from_slice(&[0; 4]);
        for (id, v) in pairs {
            r.extend_from_slice(&id.to_le_bytes());
            r.extend_from_slice(&(v.len() as u16).to_le_bytes());
            r.extend_from_slice(v);
        }
        r.extend_from_slice(&[0; 4]); // MsvAvEOL
        r
    }

    #[test]
    fn type3_names_flags_and_av_pairs() {
        let nt = ntlmv2_response(&[(2, &utf16("CORP")), (0x0a, &[7; 16])]);
        let m = parse(&type3("CORP", "Alice", "WS01", &nt)).expect("parses");
        let Message::Authenticate(a) = m else {
            panic!("expected a Type3: {m:?}");
        };
        assert_eq!(
            (a.domain.as_str(), a.user.as_str(), a.workstation.as_str()),
            ("CORP", "Alice", "WS01")
        );
        assert_eq!(a.account(), "CORP\\Alice");
        assert_ne!(a.flags & NEGOTIATE_UNICODE, 0);
        let pairs = a.ntlmv2_av_pairs.expect("NTLMv2");
        assert_eq!(pairs.len(), 2);
        assert_eq!(
            pairs[1],
            AvPair {
                id: 0x0a,
                value: vec![7; 16]
            }
        );
    }

    #[test]
    fn ntlmv1_and_anonymous_type3() {
        let Ok(Message::Authenticate(v1)) = parse(&type3("", "bob", "", &[1; 24])) else {
            panic!("v1 parses");
        };
        assert_eq!(v1.account(), "bob");
        assert_eq!(v1.ntlmv2_av_pairs, None);
        let Ok(Message::Authenticate(anon)) = parse(&type3("", "", "", &[])) else {
            panic!("anonymous parses");
        };
        assert!(anon.is_anonymous());
    }

    #[test]
    fn type1_short_and_long() {
        // curl's Type1: flags only, empty domain/workstation fields.
        let t1 = b"NTLMSSP\0\x01\0\0\0\x06\x82\x08\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let Ok(Message::Negotiate(n)) = parse(t1) else {
            panic!("Type1 parses");
        };
        assert_eq!(n.flags, 0x0008_8206);
        // The oldest form stops after the flags.
        assert!(matches!(parse(&t1[..16]), Ok(Message::Negotiate(_))));
    }

    #[test]
    fn type2_challenge_and_target_info() {
        let mut m = Vec::new();
        m.extend_from_slice(SIGNATURE);
        m.extend_from_slice(&2u32.to_le_bytes());
        let name = utf16("CORP");
        let info = [2u8, 0, 2, 0, b'X', 0, 0, 0, 0, 0];
        m.extend_from_slice(&(name.len() as u16).to_le_bytes());
        m.extend_from_slice(&(name.len() as u16).to_le_bytes());
        m.extend_from_slice(&48u32.to_le_bytes());
        m.extend_from_slice(&NEGOTIATE_UNICODE.to_le_bytes());
        m.extend_from_slice(&[9; 8]);
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&(info.len() as u16).to_le_bytes());
        m.extend_from_slice(&(info.len() as u16).to_le_bytes());
        m.extend_from_slice(&((48 + name.len()) as u32).to_le_bytes());
        m.extend_from_slice(&name);
        m.extend_from_slice(&info);
        let Ok(Message::Challenge(c)) = parse(&m) else {
            panic!("Type2 parses");
        };
        assert_eq!(c.target_name, "CORP");
        assert_eq!(c.server_challenge, [9; 8]);
        assert_eq!(
            c.target_info,
            vec![AvPair {
                id: 2,
                value: b"X\0".to_vec()
            }]
        );
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        assert_eq!(parse(b""), Err(MessageError::NoSignature));
        assert_eq!(parse(b"NTLMSSP"), Err(MessageError::Truncated(7)));
        assert_eq!(
            parse(b"NTLMSSP\0\x09\0\0\0"),
            Err(MessageError::UnknownType(9))
        );
        let mut t3 = type3("D", "u", "w", &[0; 24]);
        // The user field's offset far past the end.
        t3[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse(&t3),
            Err(MessageError::FieldOutOfBounds { field: "user" })
        );
        for cut in 0..t3.len() {
            let _ = parse(&t3[..cut]);
        }
        // An AV pair that claims more bytes than there are ends the list.
        let mut nt = ntlmv2_response(&[(2, b"ab")]);
        let n = nt.len();
        nt[n - 6] = 0xff;
        let _ = parse(&type3("", "u", "", &nt));
    }
}
