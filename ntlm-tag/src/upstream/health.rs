//! Backend health: passive (failed connects and timeouts take a backend out, with exponential backoff)
//! and optional active checks (a GET on a path, expecting a status).
#![forbid(unsafe_code)]

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use super::HealthCheckConfig;
use super::{Backend, Upstream};

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Health {
    failures: AtomicU32,
    down_until: Mutex<Option<Instant>>,
    /// Set by active checks: down until a check succeeds.
    check_failed: std::sync::atomic::AtomicBool,
}

impl Health {
    /// True when new connections may be sent here.
    pub fn is_up(&self) -> bool {
        if self.check_failed.load(Ordering::Relaxed) {
            return false;
        }
        // No failure since the last success, so no backoff to read: the usual case, asked on every
        // request, without the lock. (A failure counts itself before it sets its backoff; a
        // success racing it ends both, as a success does.)
        if self.failures.load(Ordering::Relaxed) == 0 {
            return true;
        }
        match self.down_until.lock() {
            Ok(until) => until.is_none_or(|t| Instant::now() >= t),
            Err(_) => true,
        }
    }

    /// A connect failure or timeout: out for a backoff that doubles with each consecutive failure.
    /// Returns the backoff.
    pub fn record_failure(&self) -> Duration {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << n.min(5)).min(MAX_BACKOFF);
        if let Ok(mut until) = self.down_until.lock() {
            *until = Some(Instant::now() + backoff);
        }
        backoff
    }

    /// A successful exchange: the backend is fully back.
    pub fn record_success(&self) {
        if self.failures.swap(0, Ordering::Relaxed) != 0
            && let Ok(mut until) = self.down_until.lock()
        {
            *until = None;
        }
    }

    /// Result of an active check. Returns true when the state changed.
    pub fn record_check(&self, ok: bool) -> bool {
        let was_failed = self.check_failed.swap(!ok, Ordering::Relaxed);
        if ok {
            self.record_success();
        }
        was_failed == ok
    }
}

impl Upstream {
    /// Runs active health checks until this Upstream is replaced (a reload) or the process ends:
    /// each route's check (the default pool's is `default_check`) on each of its backends. A
    /// failing check takes the backend out of that route only.
    pub fn spawn_health_checks(&self, default_check: Option<&HealthCheckConfig>) {
        for pool in self.routes.pools() {
            let check = match &pool.check {
                Some(check) => Some(check),
                None if pool.is_default() => default_check,
                None => None,
            };
            let Some(check) = check else {
                continue;
            };
            for member in &pool.members {
                let task = tokio::spawn(run_health_check(
                    pool.name().to_string(),
                    Arc::clone(&member.backend),
                    Arc::clone(&member.check),
                    check.clone(),
                ));
                if let Ok(mut checks) = self.checks.lock() {
                    checks.push(task.abort_handle());
                }
            }
        }
    }
}

/// Probes `check.path` on `backend` every interval; the outcome is `route`'s health there. A pass
/// also ends a passive backoff (the backend answers again).
pub(super) async fn run_health_check(
    route: String,
    backend: Arc<Backend>,
    health: Arc<Health>,
    check: HealthCheckConfig,
) {
    let mut interval = tokio::time::interval(check.interval);
    loop {
        interval.tick().await;
        let outcome = match tokio::time::timeout(
            check.timeout,
            probe(&backend, &check.path, check.timeout),
        )
        .await
        {
            Ok(Ok(status)) if status == check.expect_status => Ok(()),
            Ok(Ok(status)) => Err(format!("status {status}")),
            Ok(Err(ProbeFailure::Backend(why))) => Err(why),
            Ok(Err(ProbeFailure::Gateway(why))) => {
                // Not the backend's failure: its health stays as it was.
                tracing::warn!(%route, backend = %backend.authority, path = %check.path, %why, "health check skipped");
                continue;
            }
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        if outcome.is_ok() {
            backend.health.record_success();
        }
        if health.record_check(outcome.is_ok()) {
            match outcome {
                Ok(()) => {
                    tracing::info!(%route, backend = %backend.authority, path = %check.path, "health check passes again; backend back in the route's rotation")
                }
                Err(why) => {
                    tracing::warn!(%route, backend = %backend.authority, path = %check.path, %why, "health check failed; backend out of the route's rotation (other routes keep it)")
                }
            }
        }
    }
}

/// Why a health check could not get a status (the text is for the log line).
#[derive(Debug)]
pub(super) enum ProbeFailure {
    /// The backend failed: refused, reset, a broken answer.
    Backend(String),
    /// The gateway itself could not open a socket (out of descriptors, memory or local ports):
    /// says nothing about the backend.
    Gateway(String),
}

/// One health-check GET on a new connection (plain or TLS, like every exchange): the status, or
/// why the backend could not be asked.
pub(super) async fn probe(
    backend: &Backend,
    path: &str,
    timeout: Duration,
) -> Result<u16, ProbeFailure> {
    let io = backend.connect(timeout).await.map_err(|e| {
        let why = crate::error::error_chain(&e);
        match e {
            super::UpstreamError::GatewayResources { .. } => ProbeFailure::Gateway(why),
            _ => ProbeFailure::Backend(why),
        }
    })?;
    let backend_failed = |e: hyper::Error| ProbeFailure::Backend(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(backend_failed)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let req = Request::get(path)
        .header(header::HOST, backend.authority.as_str())
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeFailure::Backend(e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map(|r| r.status().as_u16())
        .map_err(backend_failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_take_a_backend_out_and_success_brings_it_back() {
        let h = Health::default();
        assert!(h.is_up());
        assert_eq!(h.record_failure(), Duration::from_secs(1));
        assert!(!h.is_up());
        assert_eq!(h.record_failure(), Duration::from_secs(2));
        h.record_success();
        assert!(h.is_up());
    }

    #[test]
    fn backoff_is_capped() {
        let h = Health::default();
        let last = (0..20).map(|_| h.record_failure()).last();
        assert_eq!(last, Some(MAX_BACKOFF));
    }

    #[test]
    fn active_checks_override_until_they_pass() {
        let h = Health::default();
        assert!(h.record_check(false));
        assert!(!h.is_up());
        assert!(!h.record_check(false));
        assert!(h.record_check(true));
        assert!(h.is_up());
    }
}
