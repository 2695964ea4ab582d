//! The client side of NTLMv2 (MS-NLMP), enough for the handshake workload: a Type1, the Type2's
//! server challenge and target info, and a Type3 whose NTLMv2 response the acceptor verifies.
//!
//! NTOWFv2    = HMAC_MD5(MD4(UTF16LE(password)), UTF16LE(UPPER(user) + domain))
//! blob       = 0x0101 0000 00000000 | timestamp | client challenge | 00000000 | target info | 00000000
//! NTProofStr = HMAC_MD5(NTOWFv2, server challenge || blob); NtChallengeResponse = NTProofStr || blob

use anyhow::{Context, Result, ensure};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use hmac::{Hmac, Mac};
use md4::{Digest, Md4};
use md5::Md5;

/// The domain the client names (the acceptor accepts any).
const DOMAIN: &str = "NTLMTAG";
const WORKSTATION: &str = "BENCH";

/// Type1 flags: OEM, REQUEST_TARGET, NTLM, ALWAYS_SIGN, EXTENDED_SESSIONSECURITY (what curl sends).
const TYPE1: &[u8; 32] = b"NTLMSSP\0\x01\0\0\0\x06\x82\x08\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
/// Type3 flags: UNICODE, REQUEST_TARGET, NTLM, ALWAYS_SIGN, EXTENDED_SESSIONSECURITY, TARGET_INFO,
/// 128, 56.
const TYPE3_FLAGS: u32 = 0xa088_8205;
/// A Type3 without Version and MIC: the payload starts right after the flags.
const TYPE3_HEADER_LEN: usize = 64;

/// One account of the acceptor, with its NTOWFv2 computed once.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub password: String,
    ntowfv2: [u8; 16],
}

impl Identity {
    pub fn new(user: &str, password: &str) -> Identity {
        Identity {
            user: user.to_string(),
            password: password.to_string(),
            ntowfv2: ntowfv2(password, user, DOMAIN),
        }
    }
}

/// The bench's accounts.
pub fn users(n: usize) -> Vec<Identity> {
    (0..n)
        .map(|i| Identity::new(&format!("bench{i:02}"), &format!("Bench-Pa55-{i}")))
        .collect()
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = <Hmac<Md5> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn ntowfv2(password: &str, user: &str, domain: &str) -> [u8; 16] {
    let nt_hash: [u8; 16] = Md4::digest(utf16le(password)).into();
    hmac_md5(
        &nt_hash,
        &[&utf16le(&format!("{}{domain}", user.to_uppercase()))],
    )
}

/// `GET /` with the Type1, keeping the connection open for the Type3.
pub fn type1_request() -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: bench\r\nAuthorization: NTLM {}\r\n\r\n",
        B64.encode(TYPE1)
    )
    .into_bytes()
}

/// `GET /` with the Type3; the server closes the connection after answering.
pub fn type3_request(type3: &[u8]) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: bench\r\nAuthorization: NTLM {}\r\nConnection: close\r\n\r\n",
        B64.encode(type3)
    )
    .into_bytes()
}

pub fn decode(token: &str) -> Result<Vec<u8>> {
    B64.decode(token.trim())
        .context("the NTLM token is not base64")
}

/// The parts of a Type2 the client needs.
struct Challenge<'a> {
    server_challenge: [u8; 8],
    target_info: &'a [u8],
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16> {
    let b = buf.get(at..at + 2).context("Type2 truncated")?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(buf: &[u8], at: usize) -> Result<u32> {
    let b = buf.get(at..at + 4).context("Type2 truncated")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn parse_type2(msg: &[u8]) -> Result<Challenge<'_>> {
    ensure!(msg.starts_with(b"NTLMSSP\0"), "not an NTLM message");
    ensure!(u32_at(msg, 8)? == 2, "not a Type2");
    let mut server_challenge = [0u8; 8];
    server_challenge.copy_from_slice(msg.get(24..32).context("Type2 truncated")?);
    let len = usize::from(u16_at(msg, 40)?);
    let offset = usize::try_from(u32_at(msg, 44)?)?;
    let target_info = msg
        .get(offset..offset + len)
        .context("Type2 target info out of bounds")?;
    Ok(Challenge {
        server_challenge,
        target_info,
    })
}

fn blob(client_challenge: [u8; 8], filetime: u64, target_info: &[u8]) -> Vec<u8> {
    let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
    blob.extend_from_slice(&filetime.to_le_bytes());
    blob.extend_from_slice(&client_challenge);
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(target_info);
    blob.extend_from_slice(&[0; 4]);
    blob
}

/// A security buffer field (length, max length, offset).
fn put_field(out: &mut Vec<u8>, len: usize, offset: usize) {
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
}

/// The Type3 answering `type2` for `id`.
pub fn type3(
    id: &Identity,
    type2: &[u8],
    client_challenge: [u8; 8],
    filetime: u64,
) -> Result<Vec<u8>> {
    let challenge = parse_type2(type2)?;
    let blob = blob(client_challenge, filetime, challenge.target_info);
    let proof = hmac_md5(&id.ntowfv2, &[&challenge.server_challenge, &blob]);
    let nt_response = [proof.as_slice(), &blob].concat();
    let fields = [
        vec![0u8; 24], // LmChallengeResponse: unused with NTLMv2 + target info
        nt_response,
        utf16le(DOMAIN),
        utf16le(&id.user),
        utf16le(WORKSTATION),
        Vec::new(), // EncryptedRandomSessionKey
    ];
    let mut msg = b"NTLMSSP\0\x03\0\0\0".to_vec();
    let mut at = TYPE3_HEADER_LEN;
    for f in &fields {
        put_field(&mut msg, f.len(), at);
        at += f.len();
    }
    msg.extend_from_slice(&TYPE3_FLAGS.to_le_bytes());
    for f in &fields {
        msg.extend_from_slice(f);
    }
    Ok(msg)
}

/// Now as a FILETIME (100 ns since 1601).
pub fn filetime_now() -> u64 {
    const UNIX_EPOCH_AS_FILETIME: u64 = 116_444_736_000_000_000;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UNIX_EPOCH_AS_FILETIME + u64::try_from(since.as_nanos() / 100).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        s.chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).expect("ascii"), 16).expect("hex"))
            .collect()
    }

    /// MS-NLMP 4.2.4: user "User", domain "Domain", password "Password".
    #[test]
    fn ms_nlmp_ntlmv2_vectors() {
        assert_eq!(
            ntowfv2("Password", "User", "Domain").to_vec(),
            hex("0c868a403bfd7a93a3001ef22ef02e3f")
        );
        let target_info =
            hex("02000c0044006f006d00610069006e00 01000c0053006500720076006500720000000000");
        let b = blob([0xaa; 8], 0, &target_info);
        let proof = hmac_md5(
            &ntowfv2("Password", "User", "Domain"),
            &[&hex("0123456789abcdef"), &b],
        );
        assert_eq!(proof.to_vec(), hex("68cd0ab851e51c96aabc927bebef6a1c"));
    }

    #[test]
    fn type3_carries_the_proof_for_the_type2_challenge() -> Result<()> {
        let info = [2u8, 0, 2, 0, b'D', 0, 0, 0, 0, 0];
        let mut type2 = b"NTLMSSP\0\x02\0\0\0".to_vec();
        type2.extend_from_slice(&[0; 12]); // target name, flags
        type2.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        type2.extend_from_slice(&[0; 8]);
        put_field(&mut type2, info.len(), 48);
        type2.extend_from_slice(&info);
        let id = Identity::new("bench00", "pw");
        let t3 = type3(&id, &type2, [9; 8], 42)?;
        let nt_len = usize::from(u16_at(&t3, 20)?);
        let nt_at = usize::try_from(u32_at(&t3, 24)?)?;
        let nt = &t3[nt_at..nt_at + nt_len];
        let expected = hmac_md5(&id.ntowfv2, &[&[1, 2, 3, 4, 5, 6, 7, 8], &nt[16..]]);
        assert_eq!(&nt[..16], &expected);
        assert_eq!(&nt[16 + 28..16 + 28 + info.len()], &info);
        assert_eq!(u32_at(&t3, 60)?, TYPE3_FLAGS);
        Ok(())
    }
}
