//! The handshake workload's NTLM side: the bench's accounts and the HTTP requests that carry a
//! login. The messages and the NTLMv2 crypto are the acceptor's own
//! (`ntlm_tag_test_acceptor::ntlm::client`), so the load generator computes exactly what the
//! backend verifies.

use anyhow::{Context, Result};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ntlm_tag_test_acceptor::ntlm::client::{self, Credentials};

pub use ntlm_tag_test_acceptor::ntlm::challenge::filetime_now;

/// The domain the client names (the acceptor accepts any).
const DOMAIN: &str = "NTLMTAG";
const WORKSTATION: &str = "BENCH";

/// One account of the acceptor, with its NTOWFv2 computed once.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub password: String,
    credentials: Credentials,
}

impl Identity {
    pub fn new(user: &str, password: &str) -> Identity {
        Identity {
            user: user.to_string(),
            password: password.to_string(),
            credentials: Credentials::new(user, DOMAIN, password),
        }
    }
}

/// The bench's accounts.
pub fn users(n: usize) -> Vec<Identity> {
    (0..n)
        .map(|i| Identity::new(&format!("bench{i:02}"), &format!("Bench-Pa55-{i}")))
        .collect()
}

/// `GET /` with the Type1, keeping the connection open for the Type3.
pub fn type1_request() -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: bench\r\nAuthorization: NTLM {}\r\n\r\n",
        B64.encode(client::NEGOTIATE)
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

/// The Type3 answering `type2` for `id`.
pub fn type3(
    id: &Identity,
    type2: &[u8],
    client_challenge: [u8; 8],
    filetime: u64,
) -> Result<Vec<u8>> {
    client::answer(
        &id.credentials,
        WORKSTATION,
        type2,
        client_challenge,
        filetime,
    )
    .context("the backend's Type2 is not a CHALLENGE_MESSAGE the client can answer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_tokens() -> Result<()> {
        let type1 = String::from_utf8(type1_request())?;
        assert!(type1.ends_with(&format!("NTLM {}\r\n\r\n", B64.encode(client::NEGOTIATE))));
        let type3 = String::from_utf8(type3_request(b"NTLMSSP\0"))?;
        assert!(type3.contains("Authorization: NTLM TlRMTVNTUAA=\r\nConnection: close\r\n"));
        assert_eq!(decode(" TlRMTVNTUAA=\r")?, b"NTLMSSP\0");
        Ok(())
    }
}
