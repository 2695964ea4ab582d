//! The live connection table shown by the admin listener and `ntlm-tag conns`.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use http::uri::Authority;
use serde::Serialize;

use crate::{
    guard::AuthState,
    identity::{ConnName, ConnectionIdentity},
};

/// One connection's row, shared by the table and the connection's [`Registration`]: one
/// allocation per connection, and the table itself holds only a key and a pointer per connection
/// (a table of whole rows keeps room for a quarter more rows than it holds, at ~400 bytes each).
#[derive(Debug)]
struct Row {
    name: Arc<ConnName>,
    /// Only with `show_full_ids`.
    id: Option<Box<str>>,
    identity: ConnectionIdentity,
    upstream: Mutex<UpstreamView>,
    /// Shared with the listener's other connections: registering one copies no string.
    listener: Arc<str>,
    started: Instant,
    requests: AtomicU64,
    auth: Mutex<AuthState>,
}

/// Where a connection's requests go now: its backend (it moves on failover) and how they reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamView {
    /// A cheap clone of the backend's own authority (no string copy per connection).
    backend: Authority,
    link: &'static str,
}

/// One row of `/connections`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConnectionRow {
    /// The keyed hash of the id, as the log lines show it (`conn=`).
    pub id_hash: String,
    /// The full id: only with `show_full_ids` (it is the connection's credential at a backend that
    /// keys sessions on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub client: String,
    pub peer: String,
    pub local: String,
    pub listener: String,
    /// `kernel` (the eBPF record) or `fallback` (the accepted peer address).
    pub identity_source: String,
    /// `peer`, `proxy-v1`, `proxy-v2`, `toa` or `ipip`.
    pub learned_from: String,
    pub balancer: Option<String>,
    /// TLVs of the PROXY v2 header (authority, unique id, SSL, AWS/Azure ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_tlvs: Option<serde_json::Value>,
    pub backend: String,
    /// How requests reach the backend: `shared` (the pool), `bound` (an upstream connection bound
    /// to this connection's NTLM session), `pinned`, or `none` (pin mode, nothing sent yet).
    #[serde(default)]
    pub upstream: String,
    pub cookie: Option<u64>,
    pub age_ms: u64,
    pub requests: u64,
    /// NTLM/Negotiate state: `anonymous`, `negotiating`, `authenticated` or `failed`.
    #[serde(default)]
    pub auth: String,
    /// `DOMAIN\user` of an `authenticated` or `failed` NTLM login (Kerberos names are encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Default)]
pub struct Registry {
    next_key: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Row>>>,
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    key: u64,
    row: Arc<Row>,
}

impl Registration {
    /// The connection's NTLM/Negotiate state now.
    pub fn auth(&self) -> AuthState {
        self.row.auth.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub fn set_auth(&self, state: AuthState) {
        if let Ok(mut auth) = self.row.auth.lock() {
            *auth = state;
        }
    }

    pub fn count_request(&self) {
        self.row.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection's backend and upstream link as they are after a request.
    pub fn set_upstream(&self, backend: &Authority, link: &'static str) {
        if let Ok(mut view) = self.row.upstream.lock()
            && (!same_authority(&view.backend, backend) || view.link != link)
        {
            *view = UpstreamView {
                backend: backend.clone(),
                link,
            };
        }
    }
}

/// Whether two authorities are equal, first by where their text lies: the view holds a clone of
/// the backend's own authority (it shares the bytes), so the usual check, made on every request,
/// is two pointer comparisons rather than a case-insensitive comparison of the text.
fn same_authority(a: &Authority, b: &Authority) -> bool {
    let (a_text, b_text) = (a.as_str(), b.as_str());
    (std::ptr::eq(a_text.as_ptr(), b_text.as_ptr()) && a_text.len() == b_text.len()) || a == b
}

/// Rows the connection table keeps room for however few connections are open (a key and a pointer
/// each, in 2,048 buckets: about 34 KiB in all). Below it, a load that opens a connection per
/// request grew and shrank the table over and over (a rehash every few dozen connections).
const KEPT_ROOM: usize = 1024;

/// The room to shrink the table to once a connection has closed, if it should shrink: after a
/// peak, not for a count that merely moves, and never below [`KEPT_ROOM`].
fn room_after_close(len: usize, capacity: usize) -> Option<usize> {
    (capacity > KEPT_ROOM && len < capacity / 4).then(|| (len * 2).max(KEPT_ROOM))
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut live) = self.registry.live.lock() {
            live.remove(&self.key);
            // The table shrinks as connections close (a peak must not keep its room for good),
            // with slack so that a steady count does not resize it back and forth.
            if let Some(room) = room_after_close(live.len(), live.capacity()) {
                live.shrink_to(room);
            }
        }
    }
}

impl Registry {
    pub fn register(
        self: &Arc<Self>,
        name: Arc<ConnName>,
        id: Option<Box<str>>,
        identity: ConnectionIdentity,
        backend: Authority,
        link: &'static str,
        listener: Arc<str>,
    ) -> Registration {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let row = Arc::new(Row {
            name,
            id,
            identity,
            upstream: Mutex::new(UpstreamView { backend, link }),
            listener,
            started: Instant::now(),
            requests: AtomicU64::new(0),
            auth: Mutex::new(AuthState::Anonymous),
        });
        if let Ok(mut live) = self.live.lock() {
            live.insert(key, Arc::clone(&row));
        }
        Registration {
            registry: Arc::clone(self),
            key,
            row,
        }
    }

    /// Open connections by auth state, in [`crate::guard::auth_state::STATE_NAMES`] order.
    pub fn auth_counts(&self) -> [u64; 4] {
        let mut counts = [0; 4];
        if let Ok(live) = self.live.lock() {
            for e in live.values() {
                if let Ok(auth) = e.auth.lock() {
                    counts[auth.index()] += 1;
                }
            }
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn rows(&self) -> Vec<ConnectionRow> {
        let Ok(live) = self.live.lock() else {
            return Vec::new();
        };
        let mut rows: Vec<(u64, ConnectionRow)> = live
            .iter()
            .map(|(key, e)| {
                let (backend, link) = e
                    .upstream
                    .lock()
                    .map(|v| (v.backend.to_string(), v.link))
                    .unwrap_or_default();
                let auth = e.auth.lock().map(|a| a.clone()).unwrap_or_default();
                (
                    *key,
                    ConnectionRow {
                        id_hash: e.name.to_string(),
                        id: e.id.as_deref().map(str::to_string),
                        client: e.identity.client.to_string(),
                        peer: e.identity.peer.to_string(),
                        local: e.identity.local.to_string(),
                        listener: e.listener.to_string(),
                        identity_source: e.identity.source.name().to_string(),
                        learned_from: e.identity.learned_from.name().to_string(),
                        balancer: e.identity.balancer.map(|b| b.to_string()),
                        proxy_tlvs: e
                            .identity
                            .proxy_tlvs
                            .as_deref()
                            .and_then(|t| serde_json::to_value(t).ok()),
                        backend,
                        upstream: link.to_string(),
                        cookie: e.identity.cookie,
                        age_ms: e.started.elapsed().as_millis() as u64,
                        requests: e.requests.load(Ordering::Relaxed),
                        auth: auth.name().to_string(),
                        user: auth.user().map(str::to_string),
                    },
                )
            })
            .collect();
        rows.sort_by_key(|(key, _)| *key);
        rows.into_iter().map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shrinks_after_a_peak_but_never_below_its_kept_room() {
        // Within the kept room the table never resizes, whatever the count.
        for len in [0, 1, 27, 64, 500, 1000] {
            assert_eq!(room_after_close(len, KEPT_ROOM), None, "{len}");
        }
        // Above it, a table far past its count shrinks to the kept room, not below.
        assert_eq!(room_after_close(27, 1792), Some(KEPT_ROOM));
        assert_eq!(room_after_close(500, 1792), None);
        // After a peak of 100,000 rows, the room follows the count down with slack.
        assert_eq!(room_after_close(20_000, 114_688), Some(40_000));
        assert_eq!(room_after_close(40_000, 114_688), None);
        assert_eq!(room_after_close(10, 114_688), Some(KEPT_ROOM));
    }
}
