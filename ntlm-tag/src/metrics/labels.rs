//! The label sets of every series: label values are enums, so a typo cannot start a new series.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use http::{HeaderMap, header};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::kernel::KernelEvent;

/// An enum whose variants are label values, with the text each shows in the exposition.
macro_rules! label_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// Why a connection on a PROXY-protocol listener was closed before any HTTP.
    pub enum ProxyRejection {
        Untrusted => "untrusted",
        Malformed => "malformed",
        Oversized => "oversized",
        Unsupported => "unsupported",
        Timeout => "timeout",
        Closed => "closed",
    }
}

label_enum! {
    /// How a client connection's identity was learned.
    pub enum ConnectionSource {
        KernelPeer => "kernel-peer",
        KernelToa => "kernel-toa",
        KernelIpip => "kernel-ipip",
        Fallback => "fallback",
        ProxyV1 => "proxy-v1",
        ProxyV2 => "proxy-v2",
    }
}

label_enum! {
    /// NTLM messages seen in `Authorization` headers.
    pub enum NtlmMessage {
        Negotiate => "negotiate",
        Authenticate => "authenticate",
        Spnego => "spnego",
    }
}

impl NtlmMessage {
    /// Which NTLM message a request's `Authorization` carries, if any.
    pub fn of_request(headers: &HeaderMap) -> Option<NtlmMessage> {
        let value = headers.get(header::AUTHORIZATION)?.as_bytes();
        let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ')?);
        let token = token.trim_ascii();
        // base64("NTLMSSP\0") = "TlRMTVNTUAA", then the message type.
        let raw_ntlm = token.starts_with(b"TlRMTVNTUAAB") || token.starts_with(b"TlRMTVNTUAAD");
        if scheme.eq_ignore_ascii_case(b"NTLM")
            || (scheme.eq_ignore_ascii_case(b"Negotiate") && raw_ntlm)
        {
            if token.starts_with(b"TlRMTVNTUAAB") {
                return Some(NtlmMessage::Negotiate);
            }
            if token.starts_with(b"TlRMTVNTUAAD") {
                return Some(NtlmMessage::Authenticate);
            }
            None
        } else if scheme.eq_ignore_ascii_case(b"Negotiate") {
            Some(NtlmMessage::Spnego)
        } else {
            None
        }
    }
}

label_enum! {
    /// What bound an upstream connection to one client connection (bind mode).
    pub enum BindTrigger {
        /// The request carried an NTLM/Negotiate token.
        Request => "request",
        /// The response carried a challenge token or `Persistent-Auth`.
        Response => "response",
    }
}

label_enum! {
    /// Which `[upstream_caps]` cap retired a bound or pinned upstream connection.
    pub enum UpstreamCap {
        MaxAge => "max_age",
        MaxRequests => "max_requests",
    }
}

label_enum! {
    /// Whether a request went on a new upstream connection or one already open.
    pub enum UpstreamUse {
        Opened => "opened",
        Reused => "reused",
    }
}

label_enum! {
    /// Where an error came from.
    pub enum Origin {
        Client => "client",
        Upstream => "upstream",
        Internal => "internal",
    }
}

label_enum! {
    pub enum UpstreamFailure {
        Error => "error",
        Timeout => "timeout",
    }
}

label_enum! {
    /// Why a backend refused an Extended Protection login (a 401 to a Type3 with a channel binding).
    pub enum EpaRefusal {
        /// The backend is plain HTTP (TLS offloading).
        PlainBackend => "plain_http_backend",
        /// The client's binding is for another certificate than the backend's.
        CertificateDiffers => "certificate_differs",
        /// The client's SPN does not name the backend.
        SpnMismatch => "spn_mismatch",
        /// Binding and SPN match: not Extended Protection's doing.
        Other => "other",
    }
}

impl EpaRefusal {
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}

label_enum! {
    pub enum ReloadResult {
        Success => "success",
        Failure => "failure",
    }
}

/// The kernel's event counters (and userspace lookup misses), listed in [`KernelEvent`].
impl EncodeLabelValue for KernelEvent {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct SourceLabel {
    pub(super) source: ConnectionSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: ProxyRejection,
}

/// A backend's `HOST:PORT` (an open set, from the configuration) and a status; `-` is the gateway
/// answering without a backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) backend: String,
    pub(super) status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct BackendLabel {
    pub(super) backend: String,
    pub(super) route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct KindLabel {
    pub(super) kind: UpstreamUse,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct FailureLabel {
    pub(super) kind: UpstreamFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct CapLabel {
    pub(super) cap: UpstreamCap,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct CauseLabel {
    pub(super) cause: EpaRefusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TriggerLabel {
    pub(super) trigger: BindTrigger,
}

label_enum! {
    /// How an NTLM/Negotiate handshake ended at the backend.
    pub enum HandshakeResult {
        Authenticated => "authenticated",
        Failed => "failed",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct HandshakeLabel {
    pub(super) result: HandshakeResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TypeLabel {
    pub(super) r#type: NtlmMessage,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct OriginLabel {
    pub(super) origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ResultLabel {
    pub(super) result: ReloadResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct EventLabel {
    pub(super) event: KernelEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct AuthStateLabel {
    pub(super) state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct LockoutKeyLabel {
    pub(super) key: &'static str,
}
