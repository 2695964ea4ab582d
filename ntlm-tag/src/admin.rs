//! The admin listener: `/healthz`, `/connections` (the live table) and `/kernel` (the eBPF side's
//! counters and records). Bind it to loopback or a management network: it shows client addresses.
#![forbid(unsafe_code)]

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    kernel::{KernelCounters, KernelTracker, monotonic_ns},
    metrics::Metrics,
    registry::Registry,
};

/// What the admin listener reports.
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub kernel: Option<Arc<KernelTracker>>,
    /// `attached`, `off`, or `unavailable: <reason>`.
    pub ebpf_status: String,
}

#[derive(Serialize)]
struct KernelReport {
    ebpf: String,
    cgroup: Option<String>,
    map_entries: Option<u32>,
    counters: Option<KernelCounters>,
    xdp: Vec<crate::kernel::XdpAttachment>,
    records: Vec<RecordRow>,
}

#[derive(Serialize)]
struct RecordRow {
    cookie: u64,
    client: String,
    peer: String,
    local: String,
    learned_from: &'static str,
    balancer: Option<String>,
    age_ms: u64,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&req, &state)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/connections" => json(&state.registry.rows()),
        "/kernel" => json(&kernel_report(state)),
        "/metrics" => {
            let kernel = state
                .kernel
                .as_deref()
                .map(|k| (k.counters(), k.map_entries()));
            let body = state
                .metrics
                .render(state.registry.len(), kernel.as_ref().map(|(c, n)| (c, *n)));
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /connections, /kernel, /metrics\n",
        ),
    }
}

fn kernel_report(state: &AdminState) -> KernelReport {
    let now = monotonic_ns();
    let kernel = state.kernel.as_deref();
    KernelReport {
        ebpf: state.ebpf_status.clone(),
        cgroup: kernel.map(|k| k.cgroup_path().display().to_string()),
        map_entries: kernel.map(KernelTracker::map_entries),
        counters: kernel.map(KernelTracker::counters),
        xdp: kernel
            .map(|k| k.xdp_attachments().to_vec())
            .unwrap_or_default(),
        records: kernel
            .map(|k| {
                k.records()
                    .into_iter()
                    .map(|(cookie, r)| RecordRow {
                        cookie,
                        client: r.client.to_string(),
                        peer: r.peer.to_string(),
                        local: r.local.to_string(),
                        learned_from: r.learned_from.name(),
                        balancer: r.balancer.map(|b| b.to_string()),
                        age_ms: now.saturating_sub(r.established_ns) / 1_000_000,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render\n"),
    }
}
