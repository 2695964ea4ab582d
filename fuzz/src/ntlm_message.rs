//! NTLM/Negotiate tokens → `ntlm_tag::ntlm`: the parser behind the connection table's auth state
//! and the lockout guard, fed whatever a client puts in `Authorization`.
//!
//! Input: the decoded token bytes (an NTLM message, a SPNEGO token, anything).
//!
//! Checked:
//! - `message::parse` and `classify` never panic, on the input and on every prefix of it;
//! - a parsed message's strings are bounded (at most 1024 bytes of field, so at most 1024 chars);
//! - `classify` of the input equals `read_token` of its base64, and a Type3 found by either names
//!   the same account;
//! - a message that parses, with its fixed part complete (Type1 32 bytes, Type2 48, Type3 64;
//!   shorter, older forms leave out optional fields), parses the same with bytes appended: fields
//!   are read by offset, never up to the end.
use base64::Engine as _;
use ntlm_tag::ntlm::{self, ClientToken, Message, message};

pub fn check(data: &[u8]) {
    let data = &data[..data.len().min(4096)];
    for cut in 0..=data.len().min(128) {
        let _ = message::parse(&data[..cut]);
        let _ = ntlm::classify(&data[..cut]);
    }
    let parsed = message::parse(data);
    if let Ok(m) = &parsed {
        for s in strings(m) {
            assert!(s.chars().count() <= 1024, "unbounded string in {m:?}");
        }
        let fixed = match m {
            Message::Negotiate(_) => 32,
            Message::Challenge(_) => 48,
            Message::Authenticate(_) => 64,
        };
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0xff; 16]);
        if data.len() >= fixed {
            assert_eq!(
                message::parse(&longer).as_ref(),
                Ok(m),
                "trailing bytes changed the message"
            );
        }
    }
    let direct = ntlm::classify(data);
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    assert_eq!(ntlm::read_token(encoded.as_bytes()), direct);
    if let Ok(Message::Authenticate(a)) = &parsed {
        let ClientToken::Ntlm(Message::Authenticate(b)) = &direct else {
            panic!("a Type3 that classify did not see: {direct:?}");
        };
        assert_eq!(a.account(), b.account());
    }
}

fn strings(m: &Message) -> Vec<&str> {
    match m {
        Message::Negotiate(n) => vec![&n.domain, &n.workstation],
        Message::Challenge(c) => vec![&c.target_name],
        Message::Authenticate(a) => vec![&a.domain, &a.user, &a.workstation],
    }
}
