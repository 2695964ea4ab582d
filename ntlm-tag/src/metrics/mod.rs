//! The gateway's metrics, kept with `prometheus-client` and shown on the admin listener's `/metrics`
//! (Prometheus text format 0.0.4). Label values are enums, so a typo cannot start a new series; the
//! metric names are those dashboards already use.
//!
//! Counters only go up. Values that live elsewhere (open connections, the kernel's counters, the
//! backends' health) are brought in at scrape time: gauges are set, and the kernel's running totals
//! advance their counters by what they grew since the last scrape.
#![forbid(unsafe_code)]

mod labels;
mod register;

use labels::*;
pub use labels::{
    BindTrigger, ConnectionSource, EpaRefusal, HandshakeResult, NtlmMessage, Origin,
    ProxyRejection, ReloadResult, UpstreamCap, UpstreamFailure, UpstreamUse,
};

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicI64, AtomicU64},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    guard::{LockoutTotals, auth_state, lockout},
    kernel::{KernelCounters, KernelEvent},
};

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

/// Whether one backend is up for one route, as the `backend_up` series shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUp {
    pub route: String,
    pub backend: String,
    pub up: bool,
}

/// What `/metrics` brings in from outside at scrape time.
pub struct Scrape<'a> {
    /// Client connections open now.
    pub connections_open: usize,
    /// The kernel's counters and its map's capacity, when the programs run.
    pub kernel: Option<(&'a KernelCounters, u32)>,
    /// Every backend of every route of the running configuration and whether it is up there.
    pub backends: Vec<BackendUp>,
    /// Open client connections by NTLM/Negotiate state, in [`auth_state::STATE_NAMES`] order.
    pub auth_states: [u64; 4],
    /// The lockout guard's running totals.
    pub lockout: LockoutTotals,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<SourceLabel, Counter>,
    /// `connections`' series in `ConnectionSource::ALL` order, each taken from the family on first
    /// use (a series still appears only once it counts) and then one atomic add: every accepted
    /// connection is counted, and the family's lookup hashed its label under a lock.
    connections_by_source: Box<[OnceLock<Counter>]>,
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
    ntlm_handshake_duration: Family<HandshakeLabel, Histogram, fn() -> Histogram>,
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
    pub fn proxy_rejected(&self, reason: ProxyRejection) {
        self.proxy_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.error(Origin::Client);
    }

    /// Counts an accepted connection by how its identity was learned.
    pub fn connection(&self, source: ConnectionSource) {
        let series = || {
            self.connections
                .get_or_create(&SourceLabel { source })
                .clone()
        };
        match ConnectionSource::ALL
            .iter()
            .position(|s| *s == source)
            .and_then(|i| self.connections_by_source.get(i))
        {
            Some(slot) => {
                slot.get_or_init(series).inc();
            }
            None => {
                series().inc();
            }
        }
    }

    /// One response sent: by the backend that was asked (`-`: none), with its status, and how long
    /// it took from the request head.
    pub fn request(&self, backend: &str, status: u16, elapsed: Duration) {
        self.response(&self.backend_counters(backend), status, elapsed);
    }

    /// An NTLM/Negotiate handshake that ended, from its first token to the backend's verdict.
    pub fn ntlm_handshake(&self, result: HandshakeResult, elapsed: Duration) {
        self.ntlm_handshake_duration
            .get_or_create(&HandshakeLabel { result })
            .observe(elapsed.as_secs_f64());
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
            self.kernel_map_records.set(
                i64::try_from(
                    k.get(KernelEvent::Recorded)
                        .saturating_sub(k.get(KernelEvent::Deleted)),
                )
                .unwrap_or(i64::MAX),
            );
            self.kernel_map_capacity.set(i64::from(capacity));
            for &event in KernelEvent::ALL {
                advance(
                    &self.kernel_events.get_or_create(&EventLabel { event }),
                    k.get(event),
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
mod tests;
