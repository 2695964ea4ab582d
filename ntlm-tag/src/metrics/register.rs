//! Every series, registered once under the names dashboards use.
#![forbid(unsafe_code)]

use std::sync::{Mutex, OnceLock, RwLock};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::guard::{auth_state, lockout};

use super::{Metrics, labels::*, unix_now};

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ntlm_tag");
        let mut m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            connections_by_source: ConnectionSource::ALL
                .iter()
                .map(|_| OnceLock::new())
                .collect(),
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
            ntlm_handshake_duration: Family::new_with_constructor(handshake_histogram),
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
        for &result in HandshakeResult::ALL {
            drop(
                m.ntlm_handshake_duration
                    .get_or_create(&HandshakeLabel { result }),
            );
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
            "ntlm_handshake_duration_seconds",
            "Time from a client connection's first NTLM/Negotiate token to the backend's verdict \
             (200: authenticated, 401 to the credentials: failed), by result",
            m.ntlm_handshake_duration.clone(),
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
}

/// 1 ms … 8 s: a LAN NTLM handshake (two round trips and a domain controller's check) to a slow one.
fn handshake_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}
