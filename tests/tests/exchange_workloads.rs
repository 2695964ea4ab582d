//! Exchange and IIS traffic shapes through the gateway (eBPF loaded), with real NTLM logins
//! (`curl --ntlm`, pyspnego) against the NTLMv2 test acceptor keyed on its own TCP connection, like
//! IIS:
//! - Outlook Anywhere `RPC_IN_DATA` / `RPC_OUT_DATA`: a 1 GiB body each way, streamed through a
//!   pinned and a bound connection while the gateway's resident memory stays flat;
//! - ActiveSync long polls: a route with a response timeout of its own outlives the default by far,
//!   while an unconfigured path still gets its 504;
//! - a WebSocket opened on the connection an NTLM login authenticated;
//! - `[upstream_caps]`: a bound connection retired together with its client connection.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, Keying, curl_ntlm},
    epa_client, fixtures,
    gateway::Gateway,
    procfs::rss_kib,
    topology::Topology,
    wait::{scaled, time_scale},
};
use serde_json::Value;

const USER: &str = "alice";
const PASSWORD: &str = "Exchange-Secret-1";
const GIB: u64 = 1 << 30;

fn users() -> Vec<(String, String)> {
    acceptor::users(&[(USER, PASSWORD)])
}

/// The IIS-like backend: NTLM keyed on its own TCP connection.
fn start_backend(topo: &Topology) -> Acceptor {
    Acceptor::start(
        &topo.backend,
        Topology::backend_addr(),
        &users(),
        Keying::Connection,
    )
}

/// A gateway in front of the acceptor, kernel programs required, with `config` as its file.
fn start_gateway(topo: &Topology, dir: &Path, config: &str) -> Gateway {
    let file = fixtures::write(dir, "ntlm-tag.toml", config);
    Gateway::new().config(file).start(&topo.gateway)
}

/// How much a transfer moves: 1 GiB, or 64 MiB in a TCG virtual machine (20x slower), where a
/// gibibyte through a debug build would take minutes. The memory bound scales with it, so a
/// gateway that buffered bodies would still fail.
fn transfer_size() -> u64 {
    if time_scale() > 1 { 64 << 20 } else { GIB }
}

/// Growth of the gateway's resident memory allowed during a transfer: far below the transfer.
fn rss_bound(size: u64) -> u64 {
    (size / 4).min(64 << 20)
}

/// Samples a process's resident memory every 10 ms until dropped; keeps the peak.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid) * 1024));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid) * 1024, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssWatch {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("sampler");
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `transfer` while watching the gateway's resident memory, and fails if it grew by `bound`
/// or more meanwhile.
fn within_memory_bound<T>(gw: &Gateway, what: &str, bound: u64, transfer: impl FnOnce() -> T) -> T {
    let before = rss_kib(gw.pid()) * 1024;
    let watch = RssWatch::start(gw.pid());
    let started = Instant::now();
    let result = transfer();
    let took = started.elapsed();
    let peak = watch.peak();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "{what}: {took:?}; gateway RSS {before} -> peak {peak} (+{growth} bytes, bound {bound})"
    );
    assert!(
        growth < bound,
        "gateway RSS grew by {growth} bytes during {what}: bodies must stream, not buffer"
    );
    result
}

/// The acceptor's log lines for requests with `method`.
fn requests_with(backend: &Acceptor, method: &str) -> Vec<Value> {
    backend
        .requests()
        .into_iter()
        .filter(|r| r["method"] == method)
        .collect()
}

/// Routes as Exchange needs them: Outlook Anywhere's RPC channels and ActiveSync answer late by
/// design, everything else keeps a short default.
const EXCHANGE_ROUTES: &str = r#"
[timeouts]
upstream_response_secs = 2

[[timeouts.route]]
path_prefix = "/rpc/rpcproxy.dll"
response_secs = 3600

[[timeouts.route]]
path_prefix = "/Microsoft-Server-ActiveSync"
response_secs = 3600
"#;

/// An `RPC_IN_DATA` upload of `size` bytes (its response comes only when the body has been read,
/// as Exchange's RPC proxy answers) and an `RPC_OUT_DATA` download of as many, each on one
/// NTLM-authenticated client connection, while the gateway's memory is watched.
fn rpc_channels_stream(mode: &str) {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = start_backend(&topo);
    let gw = start_gateway(
        &topo,
        dir.path(),
        &format!("mode = \"{mode}\"\n{EXCHANGE_ROUTES}"),
    );
    let size = transfer_size();
    let bound = rss_bound(size);
    // A sparse file: curl streams it with a Content-Length, and it takes no disk.
    let upload = dir.path().join("rpc_in_data.bin");
    std::fs::File::create(&upload)
        .and_then(|f| f.set_len(size))
        .expect("sparse upload file");
    let max_time = scaled(Duration::from_secs(120)).as_secs().to_string();
    let source = Topology::client_v4(1);

    // Warm the gateway up (its first connection allocates what every later one reuses).
    let warm = curl_ntlm(
        &topo.client,
        source,
        USER,
        PASSWORD,
        &[Topology::url("/owa/")],
        &[],
    );
    assert_eq!(warm.users(), [USER], "{}", warm.stderr);

    let upload_run = || {
        curl_ntlm(
            &topo.client,
            source,
            USER,
            PASSWORD,
            &[Topology::url("/rpc/rpcproxy.dll?exch1.corp.example:6001")],
            &[
                "-X",
                "RPC_IN_DATA",
                "-T",
                upload.to_str().expect("utf-8 path"),
                "-H",
                "Content-Type: application/rpc",
                "--max-time",
                &max_time,
            ],
        )
    };
    let what = format!("RPC_IN_DATA of {size} bytes ({mode})");
    let run = within_memory_bound(&gw, &what, bound, upload_run);
    assert!(run.success, "RPC_IN_DATA: {}", run.stderr);
    assert_eq!(run.users(), [USER], "RPC_IN_DATA answered for {USER}");
    let rpc_in = requests_with(&backend, "RPC_IN_DATA");
    let carried = rpc_in
        .iter()
        .find(|r| r["status"] == 200)
        .unwrap_or_else(|| panic!("no authenticated RPC_IN_DATA: {rpc_in:?}"));
    assert_eq!(carried["user"], USER);
    assert_eq!(
        carried["body_len"].as_u64(),
        Some(size),
        "the whole body reached the backend"
    );
    // The handshake and the upload went on one upstream connection: the one NTLM authenticated.
    let conns: Vec<_> = rpc_in.iter().map(|r| r["conn"].clone()).collect();
    assert!(conns.windows(2).all(|w| w[0] == w[1]), "{rpc_in:?}");

    let download_run = || {
        curl_ntlm(
            &topo.client,
            source,
            USER,
            PASSWORD,
            &[Topology::url(&format!(
                "/rpc/rpcproxy.dll?exch1.corp.example:6001&out_bytes={size}"
            ))],
            &[
                "-X",
                "RPC_OUT_DATA",
                "-o",
                "/dev/null",
                "-w",
                "downloaded=%{size_download} code=%{http_code}\n",
                "--max-time",
                &max_time,
            ],
        )
    };
    let what = format!("RPC_OUT_DATA of {size} bytes ({mode})");
    let run = within_memory_bound(&gw, &what, bound, download_run);
    assert!(run.success, "RPC_OUT_DATA: {}", run.stderr);
    assert_eq!(
        run.stdout.trim(),
        format!("downloaded={size} code=200"),
        "the whole response reached the client"
    );
    let rpc_out = requests_with(&backend, "RPC_OUT_DATA");
    assert!(
        rpc_out
            .iter()
            .any(|r| r["status"] == 200 && r["user"] == USER),
        "{rpc_out:?}"
    );
    drop(gw);
}

#[test]
fn outlook_anywhere_rpc_channels_stream_a_gibibyte_each_way_through_a_pinned_connection() {
    rpc_channels_stream("pin");
}

#[test]
fn outlook_anywhere_rpc_channels_stream_a_gibibyte_each_way_through_a_bound_connection() {
    rpc_channels_stream("bind");
}

/// The outcome of one `curl --ntlm` request: final status and how long it took.
fn timed_login(topo: &Topology, source: std::net::IpAddr, path: &str) -> (u16, Duration, String) {
    let started = Instant::now();
    let run = curl_ntlm(
        &topo.client,
        source,
        USER,
        PASSWORD,
        &[Topology::url(path)],
        &["-w", "\ncode=%{http_code}\n", "--max-time", "300"],
    );
    let took = started.elapsed();
    assert!(run.success, "{path}: {}", run.stderr);
    let status = run.final_status();
    (status, took, run.stdout)
}

/// ActiveSync `Ping`: the server answers when mail arrives or the heartbeat (up to an hour)
/// passes. A real two-minute long poll, sixty times the default response timeout here (2 s), is
/// answered on the route with its own timeout (3600 s, what production would set); the same wait
/// on a path without a route is cut at the default: 504. Two minutes of wall time, spent in
/// parallel with the other tests of this file.
#[test]
fn an_activesync_long_poll_outlives_the_default_response_timeout_while_other_paths_keep_it() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = start_backend(&topo);
    let gw = start_gateway(&topo, dir.path(), EXCHANGE_ROUTES);
    let poll = Duration::from_secs(120);
    let poll_ms = poll.as_millis();
    std::thread::scope(|scope| {
        let long_poll = scope.spawn(|| {
            timed_login(
                &topo,
                Topology::client_v4(1),
                &format!("/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&delay_ms={poll_ms}"),
            )
        });
        let unrouted = scope.spawn(|| {
            timed_login(
                &topo,
                Topology::client_v4(2),
                &format!("/owa/service.svc?delay_ms={poll_ms}"),
            )
        });
        let (status, took, body) = long_poll.join().expect("long poll");
        assert_eq!(status, 200, "the long poll was answered: {body}");
        assert!(body.contains("user=alice"), "{body}");
        assert!(took >= poll, "answered after {took:?}");
        let (status, took, body) = unrouted.join().expect("unrouted");
        assert_eq!(
            status, 504,
            "a path without a route keeps the default: {body}"
        );
        assert!(
            took < poll,
            "504 after {took:?}: the 2 s default, not the backend's {poll:?}"
        );
    });
    assert!(
        backend.requests().iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/Microsoft-Server-ActiveSync"))
            && r["status"] == 200
            && r["user"] == USER),
        "{:?}",
        backend.requests()
    );
    drop(gw);
}

/// Runs the pyspnego WebSocket client: an NTLM login, then a WebSocket on the same connection.
fn websocket_after_login(topo: &Topology, source: std::net::IpAddr, path: &str) -> Value {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("clients/ws_after_ntlm_client.py");
    let gateway = Topology::gateway_addr();
    let out = topo
        .client
        .command(epa_client::python().to_str().expect("utf-8 path"))
        .arg(script)
        .args([
            &gateway.ip().to_string(),
            &gateway.port().to_string(),
            USER,
            PASSWORD,
            path,
            "--source",
            &source.to_string(),
        ])
        .output()
        .expect("run the WebSocket client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "WebSocket client output {stdout:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A WebSocket (Windows Admin Center, SignalR) opened after an NTLM login on the same client
/// connection reaches the backend on the upstream connection that login authenticated, with the
/// connection id on the upgrade request; the backend's echo comes back through the tunnel; and
/// the upgraded upstream connection never serves anyone else.
#[test]
fn a_websocket_after_an_ntlm_login_is_echoed_through_the_bound_connection_and_never_pooled() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = start_backend(&topo);
    let gw = start_gateway(&topo, dir.path(), "mode = \"bind\"\n");
    let result = websocket_after_login(&topo, Topology::client_v4(1), "/signalr/connect");
    assert_eq!(result["login_status"], 200, "{result}");
    assert_eq!(result["upgrade_status"], 101, "{result}");
    assert_eq!(result["accept_ok"], true, "{result}");
    let echoes: Vec<&str> = result["echoes"]
        .as_array()
        .expect("echoes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        echoes,
        [
            "message 0 through the gateway",
            "message 1 through the gateway",
            "message 2 through the gateway"
        ],
        "{result}"
    );
    assert_eq!(
        result["close_opcode"], 8,
        "the close handshake passed: {result}"
    );

    let requests = backend.requests();
    let login = requests
        .iter()
        .find(|r| r["path"] == "/login" && r["status"] == 200)
        .unwrap_or_else(|| panic!("no login: {requests:?}"));
    let upgrade = requests
        .iter()
        .find(|r| r["path"] == "/signalr/connect")
        .unwrap_or_else(|| panic!("no upgrade request: {requests:?}"));
    assert_eq!(upgrade["status"], 101, "{upgrade}");
    assert_eq!(
        upgrade["user"], USER,
        "the upgrade ran as the logged-in user"
    );
    assert_eq!(
        upgrade["conn"], login["conn"],
        "the upgrade went on the upstream connection the login authenticated"
    );
    let id = login["conn_id"].as_str().expect("id on the login");
    assert_eq!(
        upgrade["conn_id"].as_str(),
        Some(id),
        "the upgrade request carries the client connection's id"
    );

    // Another client afterwards: a connection of its own, never the upgraded one.
    let other = curl_ntlm(
        &topo.client,
        Topology::client_v4(2),
        USER,
        PASSWORD,
        &[Topology::url("/owa/")],
        &[],
    );
    assert_eq!(other.users(), [USER], "{}", other.stderr);
    let later: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/owa/")
        .collect();
    assert!(!later.is_empty());
    assert!(
        later.iter().all(|r| r["conn"] != upgrade["conn"]),
        "the upgraded upstream connection served another client: {later:?}"
    );
    let metrics = gw.admin_metrics();
    assert!(
        metrics.contains("ntlm_tag_upgraded_connections_total 1"),
        "{metrics}"
    );
}

/// `[upstream_caps] max_requests = 3`: the bound connection carrying the login is retired at its
/// third response, and the client connection with it (so the NTLM context is never lost behind
/// the client's back): curl reconnects, authenticates again, and every answer is still alice's.
#[test]
fn a_bound_connection_at_its_request_cap_closes_with_its_client_connection() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = start_backend(&topo);
    let gw = start_gateway(
        &topo,
        dir.path(),
        "mode = \"bind\"\n[upstream_caps]\nmax_requests = 3\n",
    );
    let urls: Vec<String> = (0..4)
        .map(|i| Topology::url(&format!("/ews/exchange.asmx?r={i}")))
        .collect();
    let run = curl_ntlm(
        &topo.client,
        Topology::client_v4(1),
        USER,
        PASSWORD,
        &urls,
        &["-v"],
    );
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.users(), [USER; 4], "{}\n{}", run.stdout, run.stderr);
    // Type1 + Type3 (answering r=0) + r=1 on the first connection; then a new login for r=2, r=3.
    assert_eq!(backend.tcp_connections(), 2, "{:?}", backend.requests());
    assert!(
        run.stderr.contains("Connection: close") || run.stderr.contains("connection: close"),
        "the third response told the client to close: {}",
        run.stderr
    );
    let line = gw
        .wait_for_line("[upstream_caps] cap", scaled(Duration::from_secs(5)))
        .expect("a log line for the retired connection");
    assert!(line.contains("max_requests"), "{line}");
    let metrics = gw.admin_metrics();
    assert!(
        metrics.contains("ntlm_tag_upstream_retired_total{cap=\"max_requests\"} 2"),
        "{metrics}"
    );
}
