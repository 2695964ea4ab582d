//! PROXY protocol behind a real HAProxy, and what the gateway does with PROXY headers it must not
//! believe. Each test builds client → balancer (HAProxy, or raw bytes) → gateway (real ntlm-tag,
//! eBPF loaded, `--proxy-protocol`) → recording backend namespaces.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    time::{Duration, Instant},
};

use ntlm_tag_tests::{
    backends::recording::{Backend, Seen},
    client::Connection,
    gateway::{Gateway, GatewayBuilder},
    haproxy::{Haproxy, HaproxyOptions, HaproxyTopology, SendProxy},
    netns::NetNs,
    wait::{eventually_within, scaled},
};
use prometheus_parse::{Scrape, Value as Metric};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

/// The only balancer the gateway trusts, unless a test says otherwise.
const TRUSTED_BALANCER: &str = "198.18.1.100/32";

/// A client address the forged headers below claim to be.
const FORGED_CLIENT: &str = "203.0.113.9";
const FORGED_REQUEST: &[u8] =
    b"PROXY TCP4 203.0.113.9 198.18.1.1 1234 8080\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// The gateway behind HAProxy: PROXY protocol on `listen`, believing headers from `trusted`.
fn behind_haproxy(listen: &[SocketAddr], trusted: &[&str]) -> GatewayBuilder {
    let mut gateway = Gateway::new()
        .backend(HaproxyTopology::backend())
        .proxy_protocol(trusted);
    for addr in listen {
        gateway = gateway.listen(*addr);
    }
    gateway
}

/// A client HTTP connection made from a namespace, which stays open (on its own thread) until
/// [`close`](Self::close) or drop, so the gateway's live table can be inspected meanwhile.
struct OpenClient {
    local: SocketAddr,
    status: u16,
    release: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OpenClient {
    /// Connects from `src` to `dst`, sends `GET path` and waits for the response.
    fn get(ns: &NetNs, src: SocketAddr, dst: SocketAddr, path: &str) -> OpenClient {
        let (answered_tx, answered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let path = path.to_string();
        let thread = ns.spawn(move || async move {
            let mut conn = Connection::open(Some(src), dst).await;
            let response = conn.get(&path, &[]).await;
            let _ = answered_tx.send((conn.local, response.status));
            // Released by `close`, or by the test unwinding (the sender is dropped).
            let _ = release_rx.await;
            conn.close().await;
        });
        match answered_rx.recv() {
            Ok((local, status)) => OpenClient {
                local,
                status,
                release: Some(release_tx),
                thread: Some(thread),
            },
            Err(_) => std::panic::resume_unwind(
                thread
                    .join()
                    .expect_err("the client thread ended without an answer"),
            ),
        }
    }

    fn close(mut self) {
        self.release.take();
        if let Some(thread) = self.thread.take()
            && let Err(e) = thread.join()
        {
            std::panic::resume_unwind(e);
        }
    }
}

impl Drop for OpenClient {
    fn drop(&mut self) {
        self.release.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How a raw TCP exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The server closed (read returned 0).
    Eof,
    /// The server reset the connection.
    Reset,
    /// Still open when the wait ended.
    Open,
}

/// What the server sent back on a raw TCP connection before it ended, and when it ended (counted
/// from the connection's establishment).
struct RawReply {
    bytes: Vec<u8>,
    ending: Ending,
    after: Duration,
}

impl std::fmt::Debug for RawReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawReply")
            .field("text", &self.text())
            .field("ending", &self.ending)
            .field("after", &self.after)
            .finish()
    }
}

impl RawReply {
    fn closed(&self) -> bool {
        self.ending != Ending::Open
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Connects from `src` (port 0: any) to `dst`, sends `bytes` (if any) and reads until the server
/// closes or `wait` has passed.
async fn raw_exchange(src: SocketAddr, dst: SocketAddr, bytes: &[u8], wait: Duration) -> RawReply {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    socket
        .bind(src)
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    let mut stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst))
        .await
        .unwrap_or_else(|_| panic!("connect to {dst} timed out"))
        .unwrap_or_else(|e| panic!("connect from {src} to {dst}: {e}"));
    let start = Instant::now();
    if !bytes.is_empty() {
        // The server may have closed already; the reads below tell how.
        let _ = stream.write_all(bytes).await;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let ending = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break Ending::Open,
            Ok(Ok(0)) => break Ending::Eof,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => break Ending::Reset,
            Ok(Err(e)) => panic!("reading from {dst}: {e}"),
        }
    };
    RawReply {
        bytes: received,
        ending,
        after: start.elapsed(),
    }
}

/// The gateway's `/metrics`, parsed.
fn metrics(gw: &Gateway) -> Scrape {
    let text = gw.admin_metrics();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of the sample `name{label="value"}`.
fn sample(scrape: &Scrape, name: &str, label: (&str, &str)) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
        .unwrap_or_else(|| {
            panic!(
                "no sample {name}{{{}=\"{}\"}} in /metrics: {:#?}",
                label.0, label.1, scrape.samples
            )
        });
    match found.value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
        ref other => panic!("{name} is not a single number: {other:?}"),
    }
}

/// The sum of all samples of `name`, whatever their labels.
fn sum(scrape: &Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
            ref other => panic!("{name} is not a single number: {other:?}"),
        })
        .sum()
}

fn rejected(scrape: &Scrape, reason: &str) -> f64 {
    sample(
        scrape,
        "ntlm_tag_proxy_protocol_rejected_total",
        ("reason", reason),
    )
}

const REJECTION_REASONS: [&str; 6] = [
    "untrusted",
    "malformed",
    "oversized",
    "unsupported",
    "timeout",
    "closed",
];

/// The `/connections` row of the client connection `client`.
fn row_for(rows: &Value, client: SocketAddr) -> Value {
    rows.as_array()
        .expect("/connections is an array")
        .iter()
        .find(|r| r["client"] == client.to_string())
        .unwrap_or_else(|| panic!("no /connections row for {client}: {rows:#}"))
        .clone()
}

/// Panics if any header or the target of a request the backend saw mentions `needle`.
fn assert_backend_never_saw(seen: &[Seen], needle: &str) {
    for s in seen {
        assert!(
            !s.path.contains(needle),
            "{needle} reached the backend in the target {}",
            s.path
        );
        for (name, value) in &s.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains(needle),
                "{needle} reached the backend in {name}: {value}"
            );
        }
    }
}

/// One client through HAProxy (`send_proxy`) to the gateway: the backend must see the client's own
/// address, and the live table must say how the gateway learned it and from which balancer.
fn client_through_haproxy_is_named_by_its_own_address(send_proxy: SendProxy, learned_from: &str) {
    let topo = HaproxyTopology::new();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    // The table's id is compared with the one the backend saw: full ids, on request.
    let gw = behind_haproxy(&[HaproxyTopology::gateway_v4()], &[TRUSTED_BALANCER])
        .args(&["--show-full-ids"])
        .start(&topo.gateway);
    let _haproxy = Haproxy::start(
        &topo.balancer,
        HaproxyOptions::new(
            HaproxyTopology::front_v4(),
            HaproxyTopology::gateway_v4(),
            send_proxy,
        ),
    );

    let client = OpenClient::get(
        &topo.client,
        SocketAddr::new(HaproxyTopology::client_v4(0), 0),
        HaproxyTopology::front_v4(),
        "/through-haproxy",
    );
    assert_eq!(client.status, 200);
    let local = client.local;
    assert_eq!(local.ip(), HaproxyTopology::client_v4(0));
    let rows = gw.admin_json("/connections");
    client.close();

    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let ids = seen[0].all("jespa-connection-id");
    assert_eq!(ids.len(), 1, "exactly one id header: {ids:?}");
    assert!(
        ids[0].starts_with(&format!("{local}/")),
        "id {} should name the client {local}, not the balancer",
        ids[0]
    );
    assert_eq!(seen[0].all("x-forwarded-for"), vec![local.ip().to_string()]);
    assert_eq!(seen[0].path, "/through-haproxy");
    assert_eq!(
        seen[0].peer.ip().to_string(),
        "198.18.2.1",
        "the backend's TCP peer is the gateway"
    );

    let row = row_for(&rows, local);
    assert_eq!(row["learned_from"], learned_from, "{row:#}");
    assert_eq!(row["balancer"], "198.18.1.100", "{row:#}");
    assert_eq!(row["identity_source"], "kernel", "{row:#}");
    assert!(
        row["peer"]
            .as_str()
            .expect("peer")
            .starts_with("198.18.1.100:"),
        "the gateway's TCP peer is HAProxy: {row:#}"
    );
    assert_eq!(row["id"], ids[0].as_str(), "{row:#}");

    // HAProxy relayed exactly this one connection (its readiness probe never reached the gateway).
    let scrape = metrics(&gw);
    assert_eq!(sum(&scrape, "ntlm_tag_connections_total"), 1.0);
    assert_eq!(
        sample(
            &scrape,
            "ntlm_tag_connections_total",
            ("source", learned_from)
        ),
        1.0
    );
    assert_eq!(sum(&scrape, "ntlm_tag_proxy_protocol_rejected_total"), 0.0);
}

#[test]
fn haproxy_send_proxy_v2_names_the_real_client() {
    client_through_haproxy_is_named_by_its_own_address(SendProxy::V2, "proxy-v2");
}

#[test]
fn haproxy_send_proxy_v1_names_the_real_client() {
    client_through_haproxy_is_named_by_its_own_address(SendProxy::V1, "proxy-v1");
}

#[test]
fn ipv6_client_through_haproxy_v2_is_named_by_its_ipv6_address() {
    let topo = HaproxyTopology::new();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let balancer_v6 = format!("{}/128", HaproxyTopology::balancer_v6());
    let gw = behind_haproxy(
        &[HaproxyTopology::gateway_v6()],
        &[TRUSTED_BALANCER, &balancer_v6],
    )
    .start(&topo.gateway);
    let _haproxy = Haproxy::start(
        &topo.balancer,
        HaproxyOptions::new(
            HaproxyTopology::front_v6(),
            HaproxyTopology::gateway_v6(),
            SendProxy::V2,
        ),
    );

    let client = OpenClient::get(
        &topo.client,
        SocketAddr::new(HaproxyTopology::client_v6(0), 0),
        HaproxyTopology::front_v6(),
        "/v6",
    );
    assert_eq!(client.status, 200);
    let local = client.local;
    let rows = gw.admin_json("/connections");
    client.close();

    let prefix = format!("[{}]:{}/", HaproxyTopology::client_v6(0), local.port());
    assert_eq!(prefix, format!("{local}/"));
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let ids = seen[0].all("jespa-connection-id");
    assert_eq!(ids.len(), 1, "exactly one id header: {ids:?}");
    assert!(
        ids[0].starts_with(&prefix),
        "id {} should start with {prefix}",
        ids[0]
    );
    let row = row_for(&rows, local);
    assert_eq!(row["learned_from"], "proxy-v2", "{row:#}");
    assert_eq!(
        row["balancer"],
        HaproxyTopology::balancer_v6().to_string(),
        "{row:#}"
    );
}

#[test]
fn haproxy_outside_trusted_lbs_is_refused_and_counted() {
    let topo = HaproxyTopology::new();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let gw =
        behind_haproxy(&[HaproxyTopology::gateway_v4()], &["198.18.77.0/24"]).start(&topo.gateway);
    let _haproxy = Haproxy::start(
        &topo.balancer,
        HaproxyOptions::new(
            HaproxyTopology::front_v4(),
            HaproxyTopology::gateway_v4(),
            SendProxy::V2,
        ),
    );

    let reply = topo.client.run(|| async {
        raw_exchange(
            SocketAddr::new(HaproxyTopology::client_v4(0), 0),
            HaproxyTopology::front_v4(),
            b"GET / HTTP/1.1\r\nHost: gateway.test\r\n\r\n",
            Duration::from_secs(10),
        )
        .await
    });
    assert!(reply.closed(), "the connection must be closed: {reply:?}");
    assert!(
        reply.bytes.is_empty(),
        "no HTTP response through an untrusted balancer: {:?}",
        reply.text()
    );
    assert!(backend.seen().is_empty(), "{:#?}", backend.seen());
    let line = gw
        .wait_for_line("outside trusted_lbs", scaled(Duration::from_secs(5)))
        .unwrap_or_else(|| panic!("no warning about the untrusted peer: {:#?}", gw.log()));
    assert!(
        line.contains("198.18.1.100"),
        "the warning names the peer: {line}"
    );
    let scrape = metrics(&gw);
    assert_eq!(rejected(&scrape, "untrusted"), 1.0);
}

#[test]
fn forged_proxy_line_from_a_client_is_refused_and_never_reaches_the_backend() {
    let topo = HaproxyTopology::new();
    topo.route_clients_to_gateway();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let gw =
        behind_haproxy(&[HaproxyTopology::gateway_v4()], &[TRUSTED_BALANCER]).start(&topo.gateway);

    let reply = topo.client.run(|| async {
        raw_exchange(
            SocketAddr::new(HaproxyTopology::client_v4(1), 0),
            HaproxyTopology::gateway_v4(),
            FORGED_REQUEST,
            Duration::from_secs(10),
        )
        .await
    });
    assert!(reply.closed(), "the connection must be closed: {reply:?}");
    assert!(reply.bytes.is_empty(), "no response: {:?}", reply.text());
    let seen = backend.seen();
    assert!(seen.is_empty(), "the backend saw {seen:#?}");
    assert_backend_never_saw(&seen, FORGED_CLIENT);
    let line = gw
        .wait_for_line("outside trusted_lbs", scaled(Duration::from_secs(5)))
        .unwrap_or_else(|| panic!("no warning about the untrusted client: {:#?}", gw.log()));
    assert!(
        line.contains("198.18.10.11"),
        "the warning names the client: {line}"
    );
    assert_eq!(rejected(&metrics(&gw), "untrusted"), 1.0);
}

#[test]
fn forged_proxy_line_to_a_plain_listener_never_reaches_the_backend_as_identity() {
    let topo = HaproxyTopology::new();
    topo.route_clients_to_gateway();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let _gw = Gateway::new()
        .listen(HaproxyTopology::gateway_v4())
        .backend(&backend)
        .start(&topo.gateway);

    let (reply, local) = topo.client.run(|| async {
        let src = SocketAddr::new(HaproxyTopology::client_v4(2), 0);
        let reply = raw_exchange(
            src,
            HaproxyTopology::gateway_v4(),
            FORGED_REQUEST,
            Duration::from_secs(10),
        )
        .await;
        // The listener still serves an honest client afterwards.
        let mut conn = Connection::open(Some(src), HaproxyTopology::gateway_v4()).await;
        assert_eq!(conn.get("/honest", &[]).await.status, 200);
        let local = conn.local;
        conn.close().await;
        (reply, local)
    });
    assert!(
        reply.bytes.is_empty() || reply.text().starts_with("HTTP/1.1 400"),
        "a PROXY line on a plain listener is not HTTP: {:?}",
        reply.text()
    );
    let seen = backend.seen();
    assert_backend_never_saw(&seen, FORGED_CLIENT);
    let honest: Vec<&Seen> = seen.iter().filter(|s| s.path == "/honest").collect();
    assert_eq!(honest.len(), 1, "{seen:#?}");
    assert!(
        honest[0].all("jespa-connection-id")[0].starts_with(&format!("{local}/")),
        "{:?}",
        honest[0].all("jespa-connection-id")
    );
    assert!(
        seen.iter().all(|s| s.path == "/honest"),
        "nothing but the honest request reached the backend: {seen:#?}"
    );
}

/// Sends `header` from the trusted balancer's address straight to the gateway and checks that the
/// gateway closes the connection as malformed, forwarding nothing.
fn malformed_header_from_the_trusted_balancer_is_refused_and_counted(header: &'static [u8]) {
    let topo = HaproxyTopology::new();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let gw =
        behind_haproxy(&[HaproxyTopology::gateway_v4()], &[TRUSTED_BALANCER]).start(&topo.gateway);

    let reply = topo.balancer.run(move || async move {
        raw_exchange(
            SocketAddr::new(HaproxyTopology::balancer_v4(), 0),
            HaproxyTopology::gateway_v4(),
            header,
            Duration::from_secs(10),
        )
        .await
    });
    assert!(reply.closed(), "the connection must be closed: {reply:?}");
    assert!(reply.bytes.is_empty(), "no response: {:?}", reply.text());
    assert!(backend.seen().is_empty(), "{:#?}", backend.seen());
    gw.wait_for_line(
        "PROXY header was not acceptable",
        scaled(Duration::from_secs(5)),
    )
    .unwrap_or_else(|| panic!("no warning about the bad header: {:#?}", gw.log()));
    let scrape = metrics(&gw);
    for reason in REJECTION_REASONS {
        let expected = if reason == "malformed" { 1.0 } else { 0.0 };
        assert_eq!(
            rejected(&scrape, reason),
            expected,
            "reason {reason} for {:?} (the connection ended with {:?} after {:?})",
            String::from_utf8_lossy(header),
            reply.ending,
            reply.after
        );
    }
}

#[test]
fn invalid_address_in_a_v1_header_from_the_trusted_balancer_is_malformed() {
    malformed_header_from_the_trusted_balancer_is_refused_and_counted(
        b"PROXY TCP4 not-an-ip 198.18.1.1 1 2\r\n",
    );
}

#[test]
fn truncated_v1_line_from_the_trusted_balancer_is_malformed() {
    malformed_header_from_the_trusted_balancer_is_refused_and_counted(b"PROXY TCP4 garbage\r\n");
}

#[test]
fn silent_trusted_balancer_is_closed_after_the_header_timeout() {
    let topo = HaproxyTopology::new();
    let _backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("ntlm-tag.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [{{ address = \"{gateway}\", proxy_protocol = true }}]
backends = [\"{backend}\"]
trusted_lbs = [\"{TRUSTED_BALANCER}\"]
ebpf = \"required\"

[timeouts]
proxy_header_secs = 0.5
",
            gateway = HaproxyTopology::gateway_v4(),
            backend = HaproxyTopology::backend(),
        ),
    )
    .expect("write config");
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    let reply = topo.balancer.run(|| async {
        raw_exchange(
            SocketAddr::new(HaproxyTopology::balancer_v4(), 0),
            HaproxyTopology::gateway_v4(),
            b"",
            Duration::from_secs(10),
        )
        .await
    });
    assert_eq!(
        reply.ending,
        Ending::Eof,
        "the gateway closes a silent connection: {reply:?}"
    );
    assert!(
        reply.after >= Duration::from_millis(400),
        "closed after {:?}, before the 0.5 s header timeout",
        reply.after
    );
    let scrape = metrics(&gw);
    assert_eq!(rejected(&scrape, "timeout"), 1.0);
    assert_eq!(rejected(&scrape, "closed"), 0.0);
}

/// HAProxy's health checks (`check check-send-proxy`, HTTP) reach the gateway with a PROXY header
/// that names no client: LOCAL in v2; in v1 HAProxy 2.6 writes `PROXY TCP4` with the check
/// connection's own addresses. Either way the gateway serves them as the balancer's connections and
/// counts no rejection.
fn haproxy_health_checks_are_served_as_the_balancer(send_proxy: SendProxy) {
    let topo = HaproxyTopology::new();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let gw =
        behind_haproxy(&[HaproxyTopology::gateway_v4()], &[TRUSTED_BALANCER]).start(&topo.gateway);
    let _haproxy = Haproxy::start(
        &topo.balancer,
        HaproxyOptions::new(
            HaproxyTopology::front_v4(),
            HaproxyTopology::gateway_v4(),
            send_proxy,
        )
        .with_http_check("/haproxy-check"),
    );

    // Await the first check's request at the backend.
    let check = eventually_within(
        "a health check at the backend (and the gateway's log)",
        scaled(Duration::from_secs(20)),
        || {
            let check = backend
                .seen()
                .into_iter()
                .find(|s| s.path == "/haproxy-check");
            (check, gw.log())
        },
        |(check, _)| check.is_some(),
    )
    .0
    .expect("the check just seen");
    let ids = check.all("jespa-connection-id");
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(
        ids[0].starts_with("198.18.1.100:"),
        "a check is the balancer's own connection: {}",
        ids[0]
    );
    assert_eq!(check.all("x-forwarded-for"), vec!["198.18.1.100"]);

    let scrape = metrics(&gw);
    for reason in REJECTION_REASONS {
        assert_eq!(rejected(&scrape, reason), 0.0, "reason {reason}");
    }
    let connections = |source| sample(&scrape, "ntlm_tag_connections_total", ("source", source));
    assert!(
        sum(&scrape, "ntlm_tag_connections_total") >= 1.0,
        "the check was counted as a connection"
    );
    if send_proxy == SendProxy::V2 {
        // LOCAL leaves the identity the kernel recorded for the peer.
        assert!(connections("kernel-peer") >= 1.0);
        assert_eq!(connections("proxy-v2"), 0.0);
    }
}

#[test]
fn haproxy_v2_health_checks_with_a_local_header_are_not_rejected() {
    haproxy_health_checks_are_served_as_the_balancer(SendProxy::V2);
}

#[test]
fn haproxy_v1_health_checks_are_not_rejected() {
    haproxy_health_checks_are_served_as_the_balancer(SendProxy::V1);
}

/// A PROXY v2 header from a trusted balancer naming `client`, with `tlvs`, then one request.
fn v2_request(client: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    use ppp::v2;
    let mut header = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, HaproxyTopology::gateway_v4()),
    );
    for (kind, value) in tlvs {
        header = header.write_tlv(*kind, value).expect("TLV");
    }
    let mut bytes = header.build().expect("PROXY v2 header");
    bytes.extend_from_slice(b"GET /link HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    bytes
}

/// Client addresses overlap across AWS VPCs and Azure VNets: two clients with the same address
/// and port behind different private links must get ids that say which link, from the PROXY v2
/// TLVs of the balancer (AWS VPC endpoint id 0xEA/0x01, Azure LinkID 0xEE/0x01, any TLV by type);
/// a TLV missing renders `-`, and a value that could break the header renders as hex.
#[test]
fn ids_name_the_private_link_from_proxy_v2_tlvs() {
    let topo = HaproxyTopology::new();
    let backend = Backend::start(&topo.backend, HaproxyTopology::backend());
    let _gw = behind_haproxy(&[HaproxyTopology::gateway_v4()], &[TRUSTED_BALANCER])
        .args(&[
            "--id-template",
            "{client}/{aws_vpce_id}/{azure_link_id}/{tlv:0xE0}/{uid}",
        ])
        .start(&topo.gateway);
    // The same client address and port behind each link (overlapping VPC/VNet ranges).
    let client: SocketAddr = "10.1.2.3:40000".parse().expect("address");
    let aws = |id: &str| [&[0x01u8][..], id.as_bytes()].concat();
    let link_a = aws("vpce-0a1b2c3d4e5f60001");
    let link_b = aws("vpce-0a1b2c3d4e5f60002");
    let headers: Vec<Vec<u8>> = vec![
        v2_request(client, &[(0xEA, &link_a)]),
        v2_request(client, &[(0xEA, &link_b)]),
        v2_request(
            client,
            &[(0xEE, &[0x01, 0x2a, 0, 0, 0]), (0xE0, b"a,b;c d")],
        ),
        v2_request(client, &[]),
    ];
    for bytes in headers {
        let reply = topo.balancer.run(move || async move {
            raw_exchange(
                SocketAddr::new(HaproxyTopology::balancer_v4(), 0),
                HaproxyTopology::gateway_v4(),
                &bytes,
                Duration::from_secs(10),
            )
            .await
        });
        assert!(
            reply.text().starts_with("HTTP/1.1 200"),
            "{:?}",
            reply.text()
        );
    }
    let ids: Vec<String> = backend
        .seen()
        .iter()
        .filter(|s| s.path == "/link")
        .map(|s| s.all("jespa-connection-id").join(","))
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let prefixes = [
        "10.1.2.3:40000/vpce-0a1b2c3d4e5f60001/-/-/",
        "10.1.2.3:40000/vpce-0a1b2c3d4e5f60002/-/-/",
        "10.1.2.3:40000/-/42/0x612c623b632064/",
        "10.1.2.3:40000/-/-/-/",
    ];
    for (id, prefix) in ids.iter().zip(prefixes) {
        let uid = id
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{id:?} is not {prefix}<uid>"));
        assert_eq!(uid.len(), 39, "one uid after the link: {id:?}");
    }
}
