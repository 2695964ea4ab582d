//! How connection ids are made and carried, as the configuration builds it.
#![forbid(unsafe_code)]

use http::HeaderName;

use super::conn_id::IdTemplate;

/// The header a backend reads the connection id from, unless configured otherwise.
pub const DEFAULT_HEADER: &str = "Jespa-Connection-Id";

/// How connection ids are made and which headers carry identity.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub header: HeaderName,
    pub template: IdTemplate,
    /// Set X-Forwarded-For, X-Forwarded-Proto and Forwarded to the original client (client-sent copies
    /// are always removed).
    pub forwarded_headers: bool,
}
