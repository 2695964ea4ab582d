//! The checks behind ntlm-tag's fuzz targets, as a library so that the regression tests
//! (`tests/regressions.rs`, plain `cargo test`) replay the seed corpora and every input that once
//! failed through exactly the code the fuzzer runs.
//!
//! Each target takes raw bytes in a small format of its own (documented on its `check`), chosen so
//! that seeds are realistic inputs written by hand: a PROXY header is a PROXY header, a header
//! block is `Name: value` lines. A failed check panics with the input decoded, which libFuzzer
//! reports as a crash.

pub mod header_sanitisation;
pub mod http1_forward;
pub mod http1_head;
pub mod http1_response;
pub mod id_template;
pub mod ntlm_message;
pub mod proxy_header;
pub mod toa_options;

/// The fuzz targets, by name (the `[[bin]]`s of this crate, the directories of `corpus/`).
pub const TARGETS: [&str; 8] = [
    "proxy_header",
    "toa_options",
    "id_template",
    "header_sanitisation",
    "ntlm_message",
    "http1_head",
    "http1_response",
    "http1_forward",
];

/// Runs the check of `target` on `data`.
pub fn check(target: &str, data: &[u8]) {
    match target {
        "proxy_header" => proxy_header::check(data),
        "toa_options" => toa_options::check(data),
        "id_template" => id_template::check(data),
        "header_sanitisation" => header_sanitisation::check(data),
        "ntlm_message" => ntlm_message::check(data),
        "http1_head" => http1_head::check(data),
        "http1_response" => http1_response::check(data),
        "http1_forward" => http1_forward::check(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// A `Connection` line the gateway reads and does not keep: nothing but `close` and `keep-alive`
/// (and empty elements), which name no header past this hop. A line naming anything else stays,
/// for the hop-by-hop rewrite. Written out here rather than taken from the gateway.
pub fn is_spent_connection_line(value: &http::HeaderValue) -> bool {
    value.to_str().is_ok_and(|s| {
        s.split(',').map(str::trim).all(|t| {
            t.is_empty() || t.eq_ignore_ascii_case("close") || t.eq_ignore_ascii_case("keep-alive")
        })
    })
}

/// Asserts two header maps hold the same fields in the same order (names lower-cased by `http`,
/// values byte for byte): what the gateway parsed against what its oracle expects.
pub fn assert_same_fields(ours: &http::HeaderMap, expected: &http::HeaderMap, what: &str) {
    let fields = |h: &http::HeaderMap| {
        h.iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(fields(ours), fields(expected), "fields of {what}");
}

/// Asserts two header maps hold the same fields, each name's values in the same order (names
/// lower-cased by `http`, values byte for byte); the order of different names does not matter
/// (the gateway writes the fields it reads and the fields it passes as two groups).
pub fn assert_same_fields_by_name(ours: &http::HeaderMap, expected: &http::HeaderMap, what: &str) {
    let fields = |h: &http::HeaderMap| {
        let mut by_name = std::collections::BTreeMap::<String, Vec<Vec<u8>>>::new();
        for (n, v) in h {
            by_name
                .entry(n.as_str().to_owned())
                .or_default()
                .push(v.as_bytes().to_vec());
        }
        by_name
    };
    assert_eq!(fields(ours), fields(expected), "fields of {what}");
}
