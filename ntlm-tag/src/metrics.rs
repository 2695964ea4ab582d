//! Counters kept by userspace, shown on the admin listener's `/metrics` (Prometheus text format).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::kernel::KernelCounters;

/// Why a connection on a PROXY-protocol listener was closed before any HTTP.
#[derive(Debug, Clone, Copy)]
pub enum ProxyRejection {
    Untrusted = 0,
    Malformed = 1,
    Oversized = 2,
    Unsupported = 3,
    Timeout = 4,
    Closed = 5,
}

const REJECTION_NAMES: [&str; 6] = [
    "untrusted",
    "malformed",
    "oversized",
    "unsupported",
    "timeout",
    "closed",
];

/// Identity sources as `(label, index)`.
const SOURCE_NAMES: [&str; 7] = [
    "kernel-peer",
    "kernel-toa",
    "kernel-ipip",
    "fallback",
    "proxy-v1",
    "proxy-v2",
    "other",
];

/// NTLM messages seen in `Authorization` headers.
#[derive(Debug, Clone, Copy)]
pub enum NtlmMessage {
    Negotiate = 0,
    Authenticate = 1,
    Spnego = 2,
}

/// What bound an upstream connection to one client connection (bind mode).
#[derive(Debug, Clone, Copy)]
pub enum BindTrigger {
    /// The request carried an NTLM/Negotiate token.
    Request = 0,
    /// The response carried a challenge token or `Persistent-Auth`.
    Response = 1,
}

const BIND_TRIGGER_NAMES: [&str; 2] = ["request", "response"];

/// Why a backend refused an Extended Protection login (a 401 to a Type3 with a channel binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpaRefusal {
    /// The backend is plain HTTP (TLS offloading).
    PlainBackend = 0,
    /// The client's binding is for another certificate than the backend's.
    CertificateDiffers = 1,
    /// The client's SPN does not name the backend.
    SpnMismatch = 2,
    /// Binding and SPN match: not Extended Protection's doing.
    Other = 3,
}

const EPA_REFUSAL_NAMES: [&str; 4] = [
    "plain_http_backend",
    "certificate_differs",
    "spn_mismatch",
    "other",
];

impl EpaRefusal {
    pub fn name(self) -> &'static str {
        EPA_REFUSAL_NAMES[self as usize]
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    proxy_rejected: [AtomicU64; 6],
    connections: [AtomicU64; 7],
    connections_refused: AtomicU64,
    /// Connections already reset by their client when the gateway looked for their kernel record.
    closed_before_identified: AtomicU64,
    tls_failed: AtomicU64,
    internal_errors: AtomicU64,
    /// Client requests refused for what the client sent (a broken request body, a bad target).
    client_request_errors: AtomicU64,
    /// backend → status → count.
    requests: Mutex<HashMap<String, HashMap<u16, u64>>>,
    upstream_errors: AtomicU64,
    upstream_timeouts: AtomicU64,
    /// Upstream TCP connections opened (pool and pinned); requests minus these were reuses.
    pub upstream_opened: AtomicU64,
    pub pinned_opened: AtomicU64,
    pub pinned_open: AtomicU64,
    /// Upstream connections bound to one client connection's NTLM session, open now (bind mode).
    pub bound_open: AtomicU64,
    bindings: [AtomicU64; 2],
    /// Requests that never reached their backend and went to another one.
    upstream_failovers: AtomicU64,
    ntlm_messages: [AtomicU64; 3],
    epa_refusals: [AtomicU64; 4],
}

impl Metrics {
    pub fn proxy_rejected(&self, why: ProxyRejection) {
        self.proxy_rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an accepted connection by how its identity was learned (a label of `SOURCE_NAMES`).
    pub fn connection(&self, source: &str) {
        let i = SOURCE_NAMES
            .iter()
            .position(|s| *s == source)
            .unwrap_or(SOURCE_NAMES.len() - 1);
        self.connections[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn request(&self, backend: &str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            match map.get_mut(backend) {
                Some(by_status) => *by_status.entry(status).or_default() += 1,
                None => {
                    map.insert(backend.to_string(), HashMap::from([(status, 1)]));
                }
            }
        }
    }

    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed_before_identified(&self) {
        self.closed_before_identified
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_failed(&self) {
        self.tls_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn internal_error(&self) {
        self.internal_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn client_request_error(&self) {
        self.client_request_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ntlm_message(&self, m: NtlmMessage) {
        self.ntlm_messages[m as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bound(&self, trigger: BindTrigger) {
        self.bindings[trigger as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn epa_refused(&self, cause: EpaRefusal) {
        self.epa_refusals[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_failover(&self) {
        self.upstream_failovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_timeout(&self) {
        self.upstream_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, live: usize, kernel: Option<(&KernelCounters, u32)>) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Exposition::default();
        out.family(
            "ntlm_tag_connections_total",
            "Client connections accepted, by how the client was identified.",
            "counter",
            SOURCE_NAMES
                .iter()
                .zip(&self.connections)
                .map(|(name, v)| (format!("source=\"{name}\""), get(v))),
        );
        out.single(
            "ntlm_tag_connections_open",
            "Client connections open now.",
            "gauge",
            live as u64,
        );
        out.single(
            "ntlm_tag_connections_refused_total",
            "Connections refused at limits.max_connections.",
            "counter",
            get(&self.connections_refused),
        );
        out.single(
            "ntlm_tag_connections_reset_before_identified_total",
            "Connections the client had reset before the gateway found their kernel record (closed \
             unserved; not lookup misses).",
            "counter",
            get(&self.closed_before_identified),
        );
        out.family(
            "ntlm_tag_proxy_protocol_rejected_total",
            "Connections closed before HTTP on PROXY-protocol listeners.",
            "counter",
            REJECTION_NAMES
                .iter()
                .zip(&self.proxy_rejected)
                .map(|(name, v)| (format!("reason=\"{name}\""), get(v))),
        );
        let mut requests: Vec<(String, u64)> = Vec::new();
        if let Ok(map) = self.requests.lock() {
            for (backend, by_status) in map.iter() {
                for (status, n) in by_status {
                    requests.push((format!("backend=\"{backend}\",status=\"{status}\""), *n));
                }
            }
        }
        requests.sort();
        let total: u64 = requests.iter().map(|(_, n)| n).sum();
        out.family(
            "ntlm_tag_requests_total",
            "Requests answered, by backend and status.",
            "counter",
            requests.into_iter(),
        );
        let opened = get(&self.upstream_opened) + get(&self.pinned_opened);
        out.family(
            "ntlm_tag_upstream_connections_total",
            "Upstream connections opened, and requests that reused an open one.",
            "counter",
            [
                ("kind=\"opened\"".to_string(), opened),
                ("kind=\"reused\"".to_string(), total.saturating_sub(opened)),
            ]
            .into_iter(),
        );
        out.single(
            "ntlm_tag_pinned_connections",
            "Upstream connections pinned to one client connection (pin mode).",
            "gauge",
            get(&self.pinned_open),
        );
        out.single(
            "ntlm_tag_bound_connections",
            "Upstream connections bound to one client connection's NTLM session (bind mode), open now.",
            "gauge",
            get(&self.bound_open),
        );
        out.family(
            "ntlm_tag_upstream_bindings_total",
            "Upstream connections bound to a client connection (bind mode), by what bound them: an \
             NTLM/Negotiate token in the request, or a challenge token or Persistent-Auth in the response.",
            "counter",
            BIND_TRIGGER_NAMES
                .iter()
                .zip(&self.bindings)
                .map(|(name, v)| (format!("trigger=\"{name}\""), get(v))),
        );
        out.single(
            "ntlm_tag_upstream_failovers_total",
            "Requests that never reached their backend (connect refused or timed out, a connection \
             found closed before the request was written) and went to another backend.",
            "counter",
            get(&self.upstream_failovers),
        );
        out.family(
            "ntlm_tag_epa_refusals_total",
            "401s to NTLMv2 logins that carried an Extended Protection channel binding, by cause: \
             a plain-HTTP backend, a backend certificate other than the one the client bound to, \
             an SPN that does not name the backend, or other (not Extended Protection's).",
            "counter",
            EPA_REFUSAL_NAMES
                .iter()
                .zip(&self.epa_refusals)
                .map(|(name, v)| (format!("cause=\"{name}\""), get(v))),
        );
        out.family(
            "ntlm_tag_ntlm_messages_total",
            "NTLM/Negotiate messages seen in client Authorization headers.",
            "counter",
            ["negotiate", "authenticate", "spnego"]
                .iter()
                .zip(&self.ntlm_messages)
                .map(|(name, v)| (format!("type=\"{name}\""), get(v))),
        );
        let client_errors = self.proxy_rejected.iter().map(get).sum::<u64>()
            + get(&self.tls_failed)
            + get(&self.client_request_errors);
        out.family(
            "ntlm_tag_errors_total",
            "Errors by origin: client (PROXY header, TLS, malformed request body), upstream (502/504, a response broken off), internal.",
            "counter",
            [
                ("origin=\"client\"".to_string(), client_errors),
                (
                    "origin=\"upstream\"".to_string(),
                    get(&self.upstream_errors) + get(&self.upstream_timeouts),
                ),
                (
                    "origin=\"internal\"".to_string(),
                    get(&self.internal_errors),
                ),
            ]
            .into_iter(),
        );
        out.family(
            "ntlm_tag_upstream_errors_total",
            "Upstream exchanges that failed (502, or a response body broken off) or timed out (504).",
            "counter",
            [
                ("kind=\"error\"".to_string(), get(&self.upstream_errors)),
                ("kind=\"timeout\"".to_string(), get(&self.upstream_timeouts)),
            ]
            .into_iter(),
        );
        if let Some((k, capacity)) = kernel {
            out.single(
                "ntlm_tag_kernel_map_records",
                "Connection records in the kernel map (recorded minus deleted; LRU evictions not subtracted).",
                "gauge",
                k.recorded.saturating_sub(k.deleted),
            );
            out.single(
                "ntlm_tag_kernel_map_capacity",
                "Size of the kernel connection map.",
                "gauge",
                u64::from(capacity),
            );
            out.family(
                "ntlm_tag_kernel_events_total",
                "Events counted by the eBPF programs (and userspace lookup misses).",
                "counter",
                [
                    ("recorded", k.recorded),
                    ("deleted", k.deleted),
                    ("insert_failed", k.insert_failed),
                    ("callbacks_unavailable", k.callbacks_unavailable),
                    ("toa_accepted", k.toa_accepted),
                    ("toa_untrusted", k.toa_untrusted),
                    ("toa_malformed", k.toa_malformed),
                    ("ipip_joined", k.ipip_joined),
                    ("xdp_decapsulated", k.xdp_decapsulated),
                    ("xdp_untrusted", k.xdp_untrusted),
                    ("xdp_skipped", k.xdp_skipped),
                    ("lookup_miss", k.lookup_misses),
                ]
                .into_iter()
                .map(|(name, v)| (format!("event=\"{name}\""), v)),
            );
        }
        out.text
    }
}

/// Builds Prometheus text: one `# HELP`/`# TYPE` pair per family.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn single(&mut self, name: &str, help: &str, kind: &str, value: u64) {
        self.header(name, help, kind);
        let _ = writeln!(self.text, "{name} {value}");
    }

    fn family(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        rows: impl Iterator<Item = (String, u64)>,
    ) {
        self.header(name, help, kind);
        for (labels, value) in rows {
            let _ = writeln!(self.text, "{name}{{{labels}}} {value}");
        }
    }
}
