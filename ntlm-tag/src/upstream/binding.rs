//! When an upstream connection becomes part of one client's NTLM/Negotiate session (bind mode).
//!
//! A connection-authenticating backend (IIS, Exchange, SharePoint) keeps the security context on its
//! TCP connection from the first leg on: the Type1 creates state, the Type2 challenge names it, the
//! Type3 completes it, and `Persistent-Auth` says an authenticated connection stays so. An upstream
//! connection that carried any of these must never serve another client. A bare scheme name
//! (`WWW-Authenticate: NTLM` answering an anonymous request) creates no state, so anonymous
//! traffic keeps sharing the pool.
#![forbid(unsafe_code)]

use http::{HeaderMap, HeaderName, header};

/// The header IIS sends when an authenticated connection stays authenticated (Kerberos, and NTLM
/// with `authPersistNonNTLM`).
pub const PERSISTENT_AUTH: HeaderName = HeaderName::from_static("persistent-auth");

/// The request carries an NTLM/Negotiate token in `Authorization` (a leg of a handshake, or a
/// per-request Negotiate login): the connection that carries it must belong to this client from now on.
pub fn request_binds(headers: &HeaderMap) -> bool {
    [header::AUTHORIZATION, header::PROXY_AUTHORIZATION]
        .iter()
        .flat_map(|name| headers.get_all(name))
        .any(|v| carries_payload(v.as_bytes()))
}

/// The response carries an NTLM/Negotiate token (a Type2 challenge in a 401/407, a Kerberos
/// mutual-authentication token) or `Persistent-Auth`: the connection it came on holds a context.
///
/// Every response in bind mode asks this: one pass over its fields, as three lookups by name cost
/// more than reading a usual response's handful.
pub fn response_binds(headers: &HeaderMap) -> bool {
    headers.iter().any(|(name, value)| {
        *name == PERSISTENT_AUTH
            || ((*name == header::WWW_AUTHENTICATE || *name == header::PROXY_AUTHENTICATE)
                && value.as_bytes().split(|b| *b == b',').any(carries_token))
    })
}

/// `NTLM <anything>` or `Negotiate <anything>` in a request: whatever follows the scheme may create
/// state on a backend that parses it leniently, so a request binds on any payload, well-formed or
/// not (binding too often costs a connection; binding too rarely could share a context).
fn carries_payload(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    let Some(space) = value.iter().position(u8::is_ascii_whitespace) else {
        return false; // A bare scheme: no state on the backend.
    };
    let (scheme, payload) = value.split_at(space);
    (scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate"))
        && !payload.trim_ascii().is_empty()
}

/// `NTLM <token>` or `Negotiate <token>` in one challenge of a response (scheme case-insensitive, a
/// non-empty token68, so that the parameters of other schemes split at commas are not taken for one).
fn carries_token(element: &[u8]) -> bool {
    let element = element.trim_ascii();
    let Some(space) = element.iter().position(u8::is_ascii_whitespace) else {
        return false; // A bare scheme: no state on the backend.
    };
    let (scheme, token) = element.split_at(space);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate"))
        && !token.is_empty()
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(name, value.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn requests_with_an_ntlm_or_negotiate_token_bind() {
        for value in [
            "NTLM TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=",
            "ntlm TlRMTVNTUAADAAAAGAAYAEgAAAA=",
            "Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnagMDAuBgkqhkiC9xIBAgIGCSqGSIb3EgECAgYKKwYBBAGCNwICHgYKKwYBBAGCNwICCg==",
            "Negotiate TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=",
            "NTLM   TlRMTVNTUAAB",
            "NTLM not a token!",
        ] {
            assert!(
                request_binds(&headers(&[(header::AUTHORIZATION, value)])),
                "{value}"
            );
        }
        assert!(request_binds(&headers(&[(
            header::PROXY_AUTHORIZATION,
            "NTLM TlRMTVNTUAAB"
        )])));
        // One of several Authorization fields is enough.
        assert!(request_binds(&headers(&[
            (header::AUTHORIZATION, "Basic eDp5"),
            (header::AUTHORIZATION, "NTLM TlRMTVNTUAAB"),
        ])));
    }

    #[test]
    fn requests_without_a_token_do_not_bind() {
        assert!(!request_binds(&HeaderMap::new()));
        for value in [
            "NTLM",
            "Negotiate",
            "NTLM ",
            "Basic eDp5",
            "Bearer abc.def",
            "NTLMX TlRMTVNTUAAB",
            "Negotiated TlRM",
        ] {
            assert!(
                !request_binds(&headers(&[(header::AUTHORIZATION, value)])),
                "{value}"
            );
        }
    }

    #[test]
    fn challenges_with_a_token_and_persistent_auth_bind_responses() {
        for (name, value) in [
            (
                header::WWW_AUTHENTICATE,
                "NTLM TlRMTVNTUAACAAAADAAMADgAAAA=",
            ),
            (
                header::WWW_AUTHENTICATE,
                "Negotiate oYG2MIGzoAMKAQGhCwYJKoZIgvcSAQIC",
            ),
            (header::PROXY_AUTHENTICATE, "NTLM TlRMTVNTUAACAAAA"),
            (PERSISTENT_AUTH, "true"),
            (PERSISTENT_AUTH, "false"),
        ] {
            assert!(
                response_binds(&headers(&[(name.clone(), value)])),
                "{name}: {value}"
            );
        }
        // A token among other challenges in one field.
        assert!(response_binds(&headers(&[(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"x\", NTLM TlRMTVNTUAACAAAA"
        )])));
    }

    #[test]
    fn bare_challenges_do_not_bind_responses() {
        assert!(!response_binds(&HeaderMap::new()));
        assert!(!response_binds(&headers(&[
            (header::WWW_AUTHENTICATE, "Negotiate"),
            (header::WWW_AUTHENTICATE, "NTLM"),
        ])));
        for value in [
            "Negotiate, NTLM",
            "Basic realm=\"intranet\"",
            "Basic realm=\"a, b\", charset=\"UTF-8\"",
            "Bearer realm=\"x\", error=\"invalid_token\"",
        ] {
            assert!(
                !response_binds(&headers(&[(header::WWW_AUTHENTICATE, value)])),
                "{value}"
            );
        }
    }
}
