//! The gateway's metrics, kept with `prometheus-client` and shown on the admin listener's `/metrics`
//! (Prometheus text format 0.0.4). Label values are enums, so a typo cannot start a new series; the
//! metric names are those dashboards already use.
//!
//! Counters only go up. Values that live elsewhere (open connections, the kernel's counters, the
//! backends' health) are brought in at scrape time: gauges are set, and the kernel's running totals
//! advance their counters by what they grew since the last scrape.
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicI64, AtomicU64},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::{
    guard::{LockoutTotals, auth_state, lockout},
    kernel::KernelCounters,
};

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

label_enum! {
    /// The kernel's event counters (and userspace lookup misses).
    pub enum KernelEvent {
        Recorded => "recorded",
        Deleted => "deleted",
        InsertFailed => "insert_failed",
        CallbacksUnavailable => "callbacks_unavailable",
        ToaAccepted => "toa_accepted",
        ToaUntrusted => "toa_untrusted",
        ToaMalformed => "toa_malformed",
        IpipJoined => "ipip_joined",
        XdpDecapsulated => "xdp_decapsulated",
        XdpUntrusted => "xdp_untrusted",
        XdpSkipped => "xdp_skipped",
        XdpInnerNotTcp => "xdp_inner_not_tcp",
        XdpInnerNotLocal => "xdp_inner_not_local",
        LookupMiss => "lookup_miss",
    }
}

impl KernelEvent {
    fn of(self, k: &KernelCounters) -> u64 {
        match self {
            KernelEvent::Recorded => k.recorded,
            KernelEvent::Deleted => k.deleted,
            KernelEvent::InsertFailed => k.insert_failed,
            KernelEvent::CallbacksUnavailable => k.callbacks_unavailable,
            KernelEvent::ToaAccepted => k.toa_accepted,
            KernelEvent::ToaUntrusted => k.toa_untrusted,
            KernelEvent::ToaMalformed => k.toa_malformed,
            KernelEvent::IpipJoined => k.ipip_joined,
            KernelEvent::XdpDecapsulated => k.xdp_decapsulated,
            KernelEvent::XdpUntrusted => k.xdp_untrusted,
            KernelEvent::XdpSkipped => k.xdp_skipped,
            KernelEvent::XdpInnerNotTcp => k.xdp_inner_not_tcp,
            KernelEvent::XdpInnerNotLocal => k.xdp_inner_not_local,
            KernelEvent::LookupMiss => k.lookup_misses,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabel {
    source: ConnectionSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: ProxyRejection,
}

/// A backend's `HOST:PORT` (an open set, from the configuration) and a status; `-` is the gateway
/// answering without a backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    backend: String,
    status: u16,
}

/// One backend's `requests` series by status, each made on first use and then counted with one
/// atomic add (the family's `get_or_create` hashes the labels and needs an owned `String`). A
/// backend holds its own ([`Metrics::backend_counters`]), so counting its responses looks nothing up.
#[derive(Debug)]
pub struct StatusCounters {
    backend: String,
    family: Family<RequestLabels, Counter>,
    /// Statuses 100–599 (what hyper sends); others go through the family.
    by_status: Box<[OnceLock<Counter>]>,
}

impl StatusCounters {
    const FIRST: u16 = 100;
    const LAST: u16 = 599;

    fn new(backend: &str, family: Family<RequestLabels, Counter>) -> Self {
        StatusCounters {
            backend: backend.to_string(),
            family,
            by_status: (Self::FIRST..=Self::LAST)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    fn series(&self, status: u16) -> Counter {
        self.family
            .get_or_create(&RequestLabels {
                backend: self.backend.clone(),
                status,
            })
            .clone()
    }

    fn inc(&self, status: u16) {
        match status
            .checked_sub(Self::FIRST)
            .and_then(|i| self.by_status.get(usize::from(i)))
        {
            Some(slot) => {
                slot.get_or_init(|| self.series(status)).inc();
            }
            None => {
                self.series(status).inc();
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: UpstreamUse,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabel {
    kind: UpstreamFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CapLabel {
    cap: UpstreamCap,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabel {
    cause: EpaRefusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TriggerLabel {
    trigger: BindTrigger,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TypeLabel {
    r#type: NtlmMessage,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OriginLabel {
    origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: ReloadResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabel {
    event: KernelEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthStateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LockoutKeyLabel {
    key: &'static str,
}

/// What `/metrics` brings in from outside at scrape time.
pub struct Scrape<'a> {
    /// Client connections open now.
    pub connections_open: usize,
    /// The kernel's counters and its map's capacity, when the programs run.
    pub kernel: Option<(&'a KernelCounters, u32)>,
    /// Every backend of every route of the running configuration and whether it is up there.
    pub backends: Vec<crate::upstream::BackendState>,
    /// Open client connections by NTLM/Negotiate state, in [`auth_state::STATE_NAMES`] order.
    pub auth_states: [u64; 4],
    /// The lockout guard's running totals.
    pub lockout: LockoutTotals,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<SourceLabel, Counter>,
    connections_open: Gauge,
    connections_refused: Counter,
    closed_before_identified: Counter,
    proxy_rejected: Family<ReasonLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    /// The request counters by backend, found per response without hashing or allocating a label.
    requests_by_backend: RwLock<Vec<Arc<StatusCounters>>>,
    request_duration: Histogram,
    upstream_connections: Family<KindLabel, Counter>,
    /// `upstream_connections`' counters by `UpstreamUse` (in `UpstreamUse::ALL` order).
    upstream_uses: Vec<(UpstreamUse, Counter)>,
    upstream_connect_duration: Histogram,
    pinned_open: Gauge,
    bound_open: Gauge,
    bindings: Family<TriggerLabel, Counter>,
    upstream_failovers: Counter,
    epa_refusals: Family<CauseLabel, Counter>,
    upstream_retired: Family<CapLabel, Counter>,
    upgrades: Counter,
    ntlm_messages: Family<TypeLabel, Counter>,
    errors: Family<OriginLabel, Counter>,
    upstream_errors: Family<FailureLabel, Counter>,
    backend_up: Family<BackendLabel, Gauge>,
    reloads: Family<ResultLabel, Counter>,
    last_reload_successful: Gauge,
    last_reload_success: Gauge<f64, AtomicU64>,
    kernel_map_records: Gauge,
    kernel_map_capacity: Gauge,
    kernel_events: Family<EventLabel, Counter>,
    connections_by_auth_state: Family<AuthStateLabel, Gauge>,
    lockout_failures: Counter,
    lockout_refused: Family<LockoutKeyLabel, Counter>,
    lockout_tracked: Gauge,
    lockout_evicted: Counter,
    predecessor_connections: Gauge,
    predecessor_deadline_closed: Counter,
    /// One scrape at a time advances the kernel's counters (two at once would add a delta twice).
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ntlm_tag");
        let mut m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            closed_before_identified: Counter::default(),
            proxy_rejected: Family::default(),
            requests: Family::default(),
            requests_by_backend: RwLock::new(Vec::new()),
            // 0.5 ms … 65 s: from a pooled keep-alive request to upstream_response_secs.
            request_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            upstream_connections: Family::default(),
            upstream_uses: Vec::new(),
            // 0.1 ms … 6.6 s: a LAN connect to the default upstream_connect_secs.
            upstream_connect_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            pinned_open: Gauge::default(),
            bound_open: Gauge::default(),
            bindings: Family::default(),
            upstream_failovers: Counter::default(),
            epa_refusals: Family::default(),
            upstream_retired: Family::default(),
            upgrades: Counter::default(),
            ntlm_messages: Family::default(),
            errors: Family::default(),
            upstream_errors: Family::default(),
            backend_up: Family::default(),
            reloads: Family::default(),
            last_reload_successful: Gauge::default(),
            last_reload_success: Gauge::default(),
            kernel_map_records: Gauge::default(),
            kernel_map_capacity: Gauge::default(),
            kernel_events: Family::default(),
            connections_by_auth_state: Family::default(),
            lockout_failures: Counter::default(),
            lockout_refused: Family::default(),
            lockout_tracked: Gauge::default(),
            lockout_evicted: Counter::default(),
            predecessor_connections: Gauge::default(),
            predecessor_deadline_closed: Counter::default(),
            scrape: Mutex::new(()),
        };
        // Every labelled series exists from the start (at 0), so rates and alerts see it before
        // its first event.
        for &source in ConnectionSource::ALL {
            m.connections.get_or_create(&SourceLabel { source }).get();
        }
        for &reason in ProxyRejection::ALL {
            m.proxy_rejected
                .get_or_create(&ReasonLabel { reason })
                .get();
        }
        // Counters share their value with their clone: these are the family's own series.
        m.upstream_uses = UpstreamUse::ALL
            .iter()
            .map(|&kind| {
                let counter = m
                    .upstream_connections
                    .get_or_create(&KindLabel { kind })
                    .clone();
                (kind, counter)
            })
            .collect();
        for &trigger in BindTrigger::ALL {
            m.bindings.get_or_create(&TriggerLabel { trigger }).get();
        }
        for &cause in EpaRefusal::ALL {
            m.epa_refusals.get_or_create(&CauseLabel { cause }).get();
        }
        for &cap in UpstreamCap::ALL {
            m.upstream_retired.get_or_create(&CapLabel { cap }).get();
        }
        for &r#type in NtlmMessage::ALL {
            m.ntlm_messages.get_or_create(&TypeLabel { r#type }).get();
        }
        for &origin in Origin::ALL {
            m.errors.get_or_create(&OriginLabel { origin }).get();
        }
        for &kind in UpstreamFailure::ALL {
            m.upstream_errors
                .get_or_create(&FailureLabel { kind })
                .get();
        }
        for &result in ReloadResult::ALL {
            m.reloads.get_or_create(&ResultLabel { result }).get();
        }
        for state in auth_state::STATE_NAMES {
            m.connections_by_auth_state
                .get_or_create(&AuthStateLabel { state })
                .get();
        }
        for key in lockout::KEY_KIND_NAMES {
            m.lockout_refused
                .get_or_create(&LockoutKeyLabel { key })
                .get();
        }
        // The configuration running now was loaded successfully, at start-up.
        m.last_reload_successful.set(1);
        m.last_reload_success.set(unix_now());

        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "connections",
            "Client connections accepted, by how the client was identified",
            m.connections.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at limits.max_connections (answered 503)",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_reset_before_identified",
            "Connections the client had reset before the gateway found their kernel record (closed \
             unserved; not lookup misses)",
            m.closed_before_identified.clone(),
        );
        registry.register(
            "proxy_protocol_rejected",
            "Connections closed before HTTP on PROXY-protocol listeners",
            m.proxy_rejected.clone(),
        );
        registry.register(
            "requests",
            "Responses sent, by backend and status (backend \"-\": made by the gateway without one)",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's head to its response's head",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_connections",
            "Requests sent upstream on a newly opened connection or on one already open",
            m.upstream_connections.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Time to open an upstream connection (TCP and HTTP/1.1 handshake)",
            m.upstream_connect_duration.clone(),
        );
        registry.register(
            "pinned_connections",
            "Upstream connections pinned to one client connection (pin mode)",
            m.pinned_open.clone(),
        );
        registry.register(
            "bound_connections",
            "Upstream connections bound to one client connection's NTLM session (bind mode), open now",
            m.bound_open.clone(),
        );
        registry.register(
            "upstream_bindings",
            "Upstream connections bound to a client connection (bind mode), by what bound them: an \
             NTLM/Negotiate token in the request, or a challenge token or Persistent-Auth in the response",
            m.bindings.clone(),
        );
        registry.register(
            "upstream_failovers",
            "Requests that never reached their backend (connect refused or timed out, a connection \
             found closed before the request was written) and went to another backend",
            m.upstream_failovers.clone(),
        );
        registry.register(
            "upstream_retired",
            "Bound or pinned upstream connections closed, together with their client connection, \
             at a request boundary because they reached an [upstream_caps] cap",
            m.upstream_retired.clone(),
        );
        registry.register(
            "upgraded_connections",
            "Client connections switched to another protocol (101 Switching Protocols: WebSocket) \
             and tunnelled to their own upstream connection",
            m.upgrades.clone(),
        );
        registry.register(
            "epa_refusals",
            "401s to NTLMv2 logins that carried an Extended Protection channel binding, by cause: a \
             plain-HTTP backend, a backend certificate other than the one the client bound to, an SPN \
             that does not name the backend, or other (not Extended Protection's)",
            m.epa_refusals.clone(),
        );
        registry.register(
            "ntlm_messages",
            "NTLM/Negotiate messages seen in request Authorization headers",
            m.ntlm_messages.clone(),
        );
        registry.register(
            "errors",
            "Errors by origin: client (PROXY header, TLS, malformed request), upstream (502/504, a \
             response broken off), internal",
            m.errors.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream exchanges that failed (502, or a response body broken off) or timed out (504)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "backend_up",
            "1 while a backend takes new requests of a route (`default`: the top-level backends), 0 while \
             it is marked down or fails the route's health check",
            m.backend_up.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            m.reloads.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 if the last reload (or the start) applied its configuration, 0 if it was refused",
            m.last_reload_successful.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time the running configuration was applied (start-up or the last good reload)",
            m.last_reload_success.clone(),
        );
        registry.register(
            "kernel_map_records",
            "Connection records in the kernel map (recorded minus deleted; LRU evictions not \
             subtracted)",
            m.kernel_map_records.clone(),
        );
        registry.register(
            "kernel_map_capacity",
            "Size of the kernel connection map",
            m.kernel_map_capacity.clone(),
        );
        registry.register(
            "kernel_events",
            "Events counted by the eBPF programs (and userspace lookup misses)",
            m.kernel_events.clone(),
        );
        registry.register(
            "connections_by_auth_state",
            "Client connections open now, by NTLM/Negotiate state",
            m.connections_by_auth_state.clone(),
        );
        registry.register(
            "lockout_failures",
            "Failed NTLM logins counted by the lockout guard (a Type3 answered with 401)",
            m.lockout_failures.clone(),
        );
        registry.register(
            "lockout_refused",
            "Logins refused with 429 before the backend, by the count that was over its threshold",
            m.lockout_refused.clone(),
        );
        registry.register(
            "lockout_tracked_keys",
            "Users, addresses and users at addresses with failures counted now",
            m.lockout_tracked.clone(),
        );
        registry.register(
            "lockout_evicted",
            "Counts forgotten because lockout.max_tracked was reached (raise it if this grows)",
            m.lockout_evicted.clone(),
        );
        registry.register(
            "upgrade_predecessor_connections",
            "Connections the process this one took the listeners over from still serves (0 once \
             it exited)",
            m.predecessor_connections.clone(),
        );
        registry.register(
            "upgrade_predecessor_deadline_closed_connections",
            "Connections that process closed at its upgrade drain deadline",
            m.predecessor_deadline_closed.clone(),
        );
        registry.register(
            "build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics { registry, ..m }
    }

    pub fn proxy_rejected(&self, reason: ProxyRejection) {
        self.proxy_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.error(Origin::Client);
    }

    /// Counts an accepted connection by how its identity was learned.
    pub fn connection(&self, source: ConnectionSource) {
        self.connections
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    /// One response sent: by the backend that was asked (`-`: none), with its status, and how long
    /// it took from the request head.
    pub fn request(&self, backend: &str, status: u16, elapsed: Duration) {
        self.response(&self.backend_counters(backend), status, elapsed);
    }

    /// One response sent by a backend whose counters are at hand.
    pub fn response(&self, counters: &StatusCounters, status: u16, elapsed: Duration) {
        counters.inc(status);
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    /// The counters of `backend`, created on its first response. A handful of backends: a linear
    /// scan under a read lock costs less than hashing a label set (and allocating its `String`)
    /// for every response.
    pub fn backend_counters(&self, backend: &str) -> Arc<StatusCounters> {
        if let Ok(known) = self.requests_by_backend.read()
            && let Some(c) = known.iter().find(|c| c.backend == backend)
        {
            return Arc::clone(c);
        }
        let Ok(mut known) = self.requests_by_backend.write() else {
            return Arc::new(StatusCounters::new(backend, self.requests.clone()));
        };
        if let Some(c) = known.iter().find(|c| c.backend == backend) {
            return Arc::clone(c);
        }
        let c = Arc::new(StatusCounters::new(backend, self.requests.clone()));
        known.push(Arc::clone(&c));
        c
    }

    /// What the process this one took over from reports while it drains.
    pub fn predecessor_connections(&self, connections: usize) {
        self.predecessor_connections
            .set(i64::try_from(connections).unwrap_or(i64::MAX));
    }

    pub fn predecessor_closed_at_deadline(&self, connections: usize) {
        self.predecessor_deadline_closed
            .inc_by(u64::try_from(connections).unwrap_or(u64::MAX));
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn closed_before_identified(&self) {
        self.closed_before_identified.inc();
    }

    pub fn tls_failed(&self) {
        self.error(Origin::Client);
    }

    pub fn internal_error(&self) {
        self.error(Origin::Internal);
    }

    pub fn client_request_error(&self) {
        self.error(Origin::Client);
    }

    fn error(&self, origin: Origin) {
        self.errors.get_or_create(&OriginLabel { origin }).inc();
    }

    pub fn ntlm_message(&self, m: NtlmMessage) {
        self.ntlm_messages
            .get_or_create(&TypeLabel { r#type: m })
            .inc();
    }

    pub fn upstream_error(&self) {
        self.upstream_errors
            .get_or_create(&FailureLabel {
                kind: UpstreamFailure::Error,
            })
            .inc();
        self.error(Origin::Upstream);
    }

    pub fn upstream_timeout(&self) {
        self.upstream_errors
            .get_or_create(&FailureLabel {
                kind: UpstreamFailure::Timeout,
            })
            .inc();
        self.error(Origin::Upstream);
    }

    pub fn bound(&self, trigger: BindTrigger) {
        self.bindings.get_or_create(&TriggerLabel { trigger }).inc();
    }

    pub fn epa_refused(&self, cause: EpaRefusal) {
        self.epa_refusals.get_or_create(&CauseLabel { cause }).inc();
    }

    pub fn upstream_retired(&self, cap: UpstreamCap) {
        self.upstream_retired.get_or_create(&CapLabel { cap }).inc();
    }

    pub fn upgraded(&self) {
        self.upgrades.inc();
    }

    pub fn upstream_failover(&self) {
        self.upstream_failovers.inc();
    }

    /// A request went upstream on a new connection (`Opened`) or one already open (`Reused`).
    pub fn upstream_request(&self, kind: UpstreamUse) {
        match self.upstream_uses.iter().find(|(k, _)| *k == kind) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                self.upstream_connections
                    .get_or_create(&KindLabel { kind })
                    .inc();
            }
        }
    }

    /// An upstream connection was opened in `elapsed`.
    pub fn upstream_connected(&self, elapsed: Duration) {
        self.upstream_connect_duration
            .observe(elapsed.as_secs_f64());
    }

    pub fn pinned_open(&self) -> &Gauge<i64, AtomicI64> {
        &self.pinned_open
    }

    pub fn bound_open(&self) -> &Gauge<i64, AtomicI64> {
        &self.bound_open
    }

    /// A SIGHUP reload applied its file (`Success`) or was refused (`Failure`).
    pub fn reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        match result {
            ReloadResult::Success => {
                self.last_reload_successful.set(1);
                self.last_reload_success.set(unix_now());
            }
            ReloadResult::Failure => {
                self.last_reload_successful.set(0);
            }
        }
    }

    /// Prometheus text exposition, with what lives outside brought in first.
    pub fn render(&self, now: Scrape<'_>) -> String {
        let _one_at_a_time = self.scrape.lock();
        self.connections_open
            .set(i64::try_from(now.connections_open).unwrap_or(i64::MAX));
        // Only the running configuration's pairs: a reload that drops a route or backend drops
        // its series.
        self.backend_up.clear();
        for state in now.backends {
            self.backend_up
                .get_or_create(&BackendLabel {
                    backend: state.backend,
                    route: state.route,
                })
                .set(i64::from(state.up));
        }
        for (state, n) in auth_state::STATE_NAMES.into_iter().zip(now.auth_states) {
            self.connections_by_auth_state
                .get_or_create(&AuthStateLabel { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        advance(&self.lockout_failures, now.lockout.failures);
        for (key, n) in lockout::KEY_KIND_NAMES.into_iter().zip(now.lockout.refused) {
            advance(
                &self.lockout_refused.get_or_create(&LockoutKeyLabel { key }),
                n,
            );
        }
        self.lockout_tracked
            .set(i64::try_from(now.lockout.tracked).unwrap_or(i64::MAX));
        advance(&self.lockout_evicted, now.lockout.evicted);
        if let Some((k, capacity)) = now.kernel {
            self.kernel_map_records
                .set(i64::try_from(k.recorded.saturating_sub(k.deleted)).unwrap_or(i64::MAX));
            self.kernel_map_capacity.set(i64::from(capacity));
            for &event in KernelEvent::ALL {
                advance(
                    &self.kernel_events.get_or_create(&EventLabel { event }),
                    event.of(k),
                );
            }
        }
        let mut text = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            let _ = writeln!(text, "# cannot encode the metrics: {e}");
        }
        text
    }
}

/// Moves `counter` up to a running total kept elsewhere (the kernel's, the lockout guard's); never
/// down, so a total that was reset cannot make Prometheus read a counter reset.
fn advance(counter: &Counter, total: u64) {
    let grown = total.saturating_sub(counter.get());
    if grown > 0 {
        counter.inc_by(grown);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics, kernel: Option<(&KernelCounters, u32)>) -> String {
        m.render(Scrape {
            connections_open: 3,
            kernel,
            backends: vec![crate::upstream::BackendState {
                route: "/owa".to_string(),
                backend: "10.0.0.5:8080".to_string(),
                up: false,
            }],
            auth_states: [3, 0, 0, 0],
            lockout: LockoutTotals::default(),
        })
    }

    #[test]
    fn responses_count_by_backend_and_status_through_the_cached_series() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.request("10.0.0.5:8080", 200, Duration::ZERO);
        }
        m.request("10.0.0.6:8080", 200, Duration::ZERO);
        m.request("10.0.0.5:8080", 401, Duration::ZERO);
        m.request("-", 431, Duration::ZERO);
        // Outside the cached range: still counted, through the family.
        m.request("-", 999, Duration::ZERO);
        m.upstream_request(UpstreamUse::Reused);
        m.upstream_request(UpstreamUse::Reused);
        let text = scrape(&m, None);
        for line in [
            "ntlm_tag_requests_total{backend=\"10.0.0.5:8080\",status=\"200\"} 3",
            "ntlm_tag_requests_total{backend=\"10.0.0.6:8080\",status=\"200\"} 1",
            "ntlm_tag_requests_total{backend=\"10.0.0.5:8080\",status=\"401\"} 1",
            "ntlm_tag_requests_total{backend=\"-\",status=\"431\"} 1",
            "ntlm_tag_requests_total{backend=\"-\",status=\"999\"} 1",
            "ntlm_tag_upstream_connections_total{kind=\"reused\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn the_names_dashboards_use_are_kept() {
        let m = Metrics::new();
        let text = scrape(&m, Some((&KernelCounters::default(), 1024)));
        for name in [
            "ntlm_tag_connections_total{source=\"kernel-peer\"} 0",
            "ntlm_tag_connections_open 3",
            "ntlm_tag_connections_refused_total 0",
            "ntlm_tag_connections_reset_before_identified_total 0",
            "ntlm_tag_proxy_protocol_rejected_total{reason=\"untrusted\"} 0",
            "ntlm_tag_upstream_connections_total{kind=\"reused\"} 0",
            "ntlm_tag_pinned_connections 0",
            "ntlm_tag_bound_connections 0",
            "ntlm_tag_upstream_bindings_total{trigger=\"response\"} 0",
            "ntlm_tag_upstream_failovers_total 0",
            "ntlm_tag_upstream_retired_total{cap=\"max_requests\"} 0",
            "ntlm_tag_upgraded_connections_total 0",
            "ntlm_tag_epa_refusals_total{cause=\"certificate_differs\"} 0",
            "ntlm_tag_ntlm_messages_total{type=\"spnego\"} 0",
            "ntlm_tag_errors_total{origin=\"client\"} 0",
            "ntlm_tag_upstream_errors_total{kind=\"timeout\"} 0",
            "ntlm_tag_kernel_map_records 0",
            "ntlm_tag_kernel_map_capacity 1024",
            "ntlm_tag_kernel_events_total{event=\"lookup_miss\"} 0",
            "ntlm_tag_backend_up{backend=\"10.0.0.5:8080\",route=\"/owa\"} 0",
            "ntlm_tag_config_reloads_total{result=\"failure\"} 0",
            "ntlm_tag_config_last_reload_successful 1",
            "ntlm_tag_build_info{version=\"",
            "ntlm_tag_connections_by_auth_state{state=\"anonymous\"} 3",
            "ntlm_tag_lockout_failures_total 0",
            "ntlm_tag_lockout_refused_total{key=\"user_at_address\"} 0",
            "ntlm_tag_lockout_tracked_keys 0",
            "ntlm_tag_lockout_evicted_total 0",
            "# TYPE ntlm_tag_request_duration_seconds histogram",
            "# TYPE ntlm_tag_upstream_connect_duration_seconds histogram",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn kernel_totals_advance_counters_and_never_move_them_back() {
        let m = Metrics::new();
        let mut k = KernelCounters {
            recorded: 5,
            ..KernelCounters::default()
        };
        assert!(scrape(&m, Some((&k, 8))).contains("event=\"recorded\"} 5"));
        k.recorded = 9;
        assert!(scrape(&m, Some((&k, 8))).contains("event=\"recorded\"} 9"));
        // A smaller total (a reset map) never lowers a counter.
        k.recorded = 2;
        assert!(scrape(&m, Some((&k, 8))).contains("event=\"recorded\"} 9"));
    }

    #[test]
    fn errors_and_reloads_are_counted_where_they_happen() {
        let m = Metrics::new();
        m.proxy_rejected(ProxyRejection::Timeout);
        m.tls_failed();
        m.upstream_timeout();
        m.reload(ReloadResult::Failure);
        let text = scrape(&m, None);
        assert!(
            text.contains("ntlm_tag_errors_total{origin=\"client\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ntlm_tag_errors_total{origin=\"upstream\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ntlm_tag_config_last_reload_successful 0"),
            "{text}"
        );
    }
}
