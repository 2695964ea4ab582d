//! Recognising NTLM/Negotiate in headers without decoding the token: which scheme a request's
//! `Authorization` names and whether a response challenges.

use http::{HeaderMap, Response, StatusCode, header};

/// `Authorization: NTLM …` or `Negotiate …` (also the bare scheme).
pub fn is_ntlm_request(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| is_ntlm_scheme(v.as_bytes()))
}

/// A 401 offering NTLM/Negotiate, or a 407 with `Proxy-Authenticate` doing so.
pub fn is_ntlm_challenge<B>(response: &Response<B>) -> bool {
    let name = match response.status() {
        StatusCode::UNAUTHORIZED => header::WWW_AUTHENTICATE,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => header::PROXY_AUTHENTICATE,
        _ => return false,
    };
    response
        .headers()
        .get_all(name)
        .iter()
        .any(|v| is_ntlm_scheme(v.as_bytes()))
}

fn is_ntlm_scheme(value: &[u8]) -> bool {
    let scheme = value
        .split(|b| *b == b' ' || *b == b',')
        .next()
        .unwrap_or_default();
    scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntlm_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "NTLM TlRMTVNTUAABAAAA".parse().expect("v"),
        );
        assert!(is_ntlm_request(&h));
        h.insert(header::AUTHORIZATION, "negotiate YIIG".parse().expect("v"));
        assert!(is_ntlm_request(&h));
        h.insert(header::AUTHORIZATION, "Basic eDp5".parse().expect("v"));
        assert!(!is_ntlm_request(&h));
        h.insert(header::AUTHORIZATION, "NTLMX abc".parse().expect("v"));
        assert!(!is_ntlm_request(&h));
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut().append(
            header::WWW_AUTHENTICATE,
            "Basic realm=x".parse().expect("v"),
        );
        assert!(!is_ntlm_challenge(&r));
        r.headers_mut()
            .append(header::WWW_AUTHENTICATE, "NTLM".parse().expect("v"));
        assert!(is_ntlm_challenge(&r));
        *r.status_mut() = StatusCode::OK;
        assert!(!is_ntlm_challenge(&r));
    }
}
