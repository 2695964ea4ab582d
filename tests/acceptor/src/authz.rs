//! The `Authorization` request header: `NTLM <base64>` or `Negotiate <base64 of a raw NTLM
//! message>` (SPNEGO-wrapped tokens are not unwrapped; they fail as malformed NTLM).

use base64::Engine;
use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::HeaderMap;
use http::header::AUTHORIZATION;

/// Standard alphabet, padding optional.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Longest decoded token accepted (real Type3s are well under 2 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest unknown scheme name echoed into the log.
const MAX_SCHEME_LOG_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Ntlm,
    Negotiate,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Ntlm => "NTLM",
            Mechanism::Negotiate => "Negotiate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    #[error("more than one Authorization header")]
    Repeated,
    #[error("Authorization header is not visible ASCII")]
    NotAscii,
    #[error("unsupported Authorization scheme {0:?}")]
    UnsupportedScheme(String),
    #[error("{0} without a token")]
    MissingToken(&'static str),
    #[error("token is not base64: {0}")]
    BadBase64(#[from] base64::DecodeError),
    #[error("token longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
}

/// What the client presented: the scheme as it will be logged, and the decoded token or why
/// there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub scheme: String,
    pub token: Result<(Mechanism, Vec<u8>), AuthzError>,
}

/// `None` when the request has no `Authorization` header.
pub fn from_headers(headers: &HeaderMap) -> Option<Presented> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let first = values.next()?;
    let repeated = values.next().is_some();
    let Ok(text) = first.to_str() else {
        return Some(Presented {
            scheme: String::from_utf8_lossy(first.as_bytes())
                .chars()
                .take_while(|c| !c.is_whitespace())
                .take(MAX_SCHEME_LOG_LEN)
                .collect(),
            token: Err(AuthzError::NotAscii),
        });
    };
    let text = text.trim();
    let (scheme, rest) = text.split_once([' ', '\t']).unwrap_or((text, ""));
    let mechanism = if scheme.eq_ignore_ascii_case("NTLM") {
        Some(Mechanism::Ntlm)
    } else if scheme.eq_ignore_ascii_case("Negotiate") {
        Some(Mechanism::Negotiate)
    } else {
        None
    };
    let logged = match mechanism {
        Some(m) => m.as_str().to_string(),
        None => scheme.chars().take(MAX_SCHEME_LOG_LEN).collect(),
    };
    let token = match mechanism {
        _ if repeated => Err(AuthzError::Repeated),
        None => Err(AuthzError::UnsupportedScheme(logged.clone())),
        Some(m) => decode(m, rest.trim()).map(|t| (m, t)),
    };
    Some(Presented {
        scheme: logged,
        token,
    })
}

fn decode(mechanism: Mechanism, token: &str) -> Result<Vec<u8>, AuthzError> {
    if token.is_empty() {
        return Err(AuthzError::MissingToken(mechanism.as_str()));
    }
    // Base64 grows by 4/3; refuse before decoding anything absurd.
    if token.len() > MAX_TOKEN_LEN / 3 * 4 + 4 {
        return Err(AuthzError::TooLong);
    }
    Ok(LENIENT.decode(token)?)
}

/// The `WWW-Authenticate` value carrying a Type2.
pub fn challenge_header(mechanism: Mechanism, type2: &[u8]) -> String {
    format!(
        "{} {}",
        mechanism.as_str(),
        base64::engine::general_purpose::STANDARD.encode(type2)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn presented(values: &[&[u8]]) -> Option<Presented> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                AUTHORIZATION,
                HeaderValue::from_bytes(v).expect("header value"),
            );
        }
        from_headers(&h)
    }

    #[test]
    fn schemes_and_tokens() {
        assert_eq!(presented(&[]), None);
        let p = presented(&[b"ntlm TlRMTVNTUAAB"]).expect("presented");
        assert_eq!(p.scheme, "NTLM");
        assert_eq!(p.token, Ok((Mechanism::Ntlm, b"NTLMSSP\0\x01".to_vec())));
        let p = presented(&[b"Negotiate  TlRMTVNTUAAB  "]).expect("presented");
        assert_eq!(p.scheme, "Negotiate");
        assert_eq!(
            p.token,
            Ok((Mechanism::Negotiate, b"NTLMSSP\0\x01".to_vec()))
        );
    }

    #[test]
    fn bad_headers() {
        let token = |v: &[&[u8]]| presented(v).expect("presented").token;
        assert_eq!(token(&[b"NTLM"]), Err(AuthzError::MissingToken("NTLM")));
        assert!(matches!(
            token(&[b"NTLM !!!!"]),
            Err(AuthzError::BadBase64(_))
        ));
        assert_eq!(
            token(&[b"Basic YTpi"]),
            Err(AuthzError::UnsupportedScheme("Basic".to_string()))
        );
        assert_eq!(token(&[b"NTLM \xff\xfe"]), Err(AuthzError::NotAscii));
        assert_eq!(
            token(&[b"NTLM TlRMTVNTUAAB", b"NTLM TlRMTVNTUAAB"]),
            Err(AuthzError::Repeated)
        );
        let huge = format!("NTLM {}", "A".repeat(MAX_TOKEN_LEN * 2));
        assert_eq!(token(&[huge.as_bytes()]), Err(AuthzError::TooLong));
    }

    #[test]
    fn challenge_header_echoes_the_mechanism() {
        assert_eq!(
            challenge_header(Mechanism::Negotiate, b"ab"),
            "Negotiate YWI="
        );
        assert_eq!(challenge_header(Mechanism::Ntlm, b"ab"), "NTLM YWI=");
    }
}
