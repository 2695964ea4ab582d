//! NTLM messages (MS-NLMP) as an acceptor sees them, and the NTLMv2 check.
//!
//! Everything that reads bytes from the wire returns [`NtlmError`] on anything it does not
//! understand; nothing here indexes a slice without a bounds check.

pub mod authenticate;
pub mod binding;
pub mod challenge;
pub mod client;
pub mod crypto;
pub mod negotiate;
pub mod samples;
pub mod wire;

pub use authenticate::Authenticate;
pub use challenge::{ServerNames, build_challenge};
pub use negotiate::Negotiate;

/// NEGOTIATE_MESSAGE (Type1).
pub const TYPE_NEGOTIATE: u32 = 1;
/// CHALLENGE_MESSAGE (Type2).
pub const TYPE_CHALLENGE: u32 = 2;
/// AUTHENTICATE_MESSAGE (Type3).
pub const TYPE_AUTHENTICATE: u32 = 3;

/// NegotiateFlags bits used here (MS-NLMP 2.2.2.5).
pub mod flags {
    pub const UNICODE: u32 = 0x0000_0001;
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    pub const NTLM: u32 = 0x0000_0200;
    pub const ALWAYS_SIGN: u32 = 0x0000_8000;
    pub const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
    pub const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    pub const TARGET_INFO: u32 = 0x0080_0000;
    pub const VERSION: u32 = 0x0200_0000;
    pub const NEGOTIATE_128: u32 = 0x2000_0000;
    pub const NEGOTIATE_56: u32 = 0x8000_0000;
}

/// Why a token is not an NTLM message this acceptor can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    #[error("message too short: {got} bytes, need at least {needed}")]
    TooShort { needed: usize, got: usize },
    #[error("no NTLMSSP signature")]
    BadSignature,
    #[error("expected message type {expected}, got {got}")]
    WrongType { expected: u32, got: u32 },
    #[error("field {field} points outside the message")]
    FieldOutOfBounds { field: &'static str },
    #[error("field {field} is not valid UTF-16LE")]
    BadUnicode { field: &'static str },
}

/// The MessageType of an NTLM token, after checking its signature.
pub fn message_type(token: &[u8]) -> Result<u32, NtlmError> {
    wire::header(token)
}
