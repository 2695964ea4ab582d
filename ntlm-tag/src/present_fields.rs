//! Which of the fields the gateway's checks read a message carries, found in one pass over its
//! header map. Most requests and responses carry none of them (no `Authorization` once a
//! connection is authenticated, no `Upgrade`, no `Transfer-Encoding`), and a lookup by name (hash
//! and probe) for each check cost more than one pass over a usual message's handful of names.
#![forbid(unsafe_code)]

use http::{HeaderMap, header};

/// The fields present; a check whose field is absent has nothing to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresentFields {
    pub authorization: bool,
    pub proxy_authorization: bool,
    pub upgrade: bool,
    pub transfer_encoding: bool,
    pub host: bool,
}

impl PresentFields {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut present = PresentFields::default();
        for name in headers.keys() {
            if *name == header::AUTHORIZATION {
                present.authorization = true;
            } else if *name == header::PROXY_AUTHORIZATION {
                present.proxy_authorization = true;
            } else if *name == header::UPGRADE {
                present.upgrade = true;
            } else if *name == header::TRANSFER_ENCODING {
                present.transfer_encoding = true;
            } else if *name == header::HOST {
                present.host = true;
            }
        }
        present
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_is_found_in_any_case_and_others_are_not_taken_for_it() {
        let mut headers = HeaderMap::new();
        for name in [
            "accept",
            "x-authorization",
            "upgrade-insecure-requests",
            "x-host",
        ] {
            headers.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static("1"),
            );
        }
        assert_eq!(PresentFields::of(&headers), PresentFields::default());
        for (name, expected) in [
            (
                "Authorization",
                PresentFields {
                    authorization: true,
                    ..Default::default()
                },
            ),
            (
                "PROXY-AUTHORIZATION",
                PresentFields {
                    proxy_authorization: true,
                    ..Default::default()
                },
            ),
            (
                "upgrade",
                PresentFields {
                    upgrade: true,
                    ..Default::default()
                },
            ),
            (
                "Transfer-Encoding",
                PresentFields {
                    transfer_encoding: true,
                    ..Default::default()
                },
            ),
            (
                "Host",
                PresentFields {
                    host: true,
                    ..Default::default()
                },
            ),
        ] {
            let mut with = headers.clone();
            with.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                http::HeaderValue::from_static("x"),
            );
            assert_eq!(PresentFields::of(&with), expected, "{name}");
        }
    }
}
