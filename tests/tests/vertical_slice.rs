//! The vertical slice: kernel-recorded identity stamped on every upstream request.
//! Each test builds client → gateway (real ntlm-tag, eBPF loaded) → recording backend namespaces.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use ntlm_tag_tests::{
    backends::recording::Backend,
    client::{Connection, get_then_reset},
    gateway::{Gateway, Started},
    topology::Topology,
    wait::scaled,
};
use serde_json::Value;

fn connections(gw: &Gateway) -> Vec<Value> {
    gw.admin_json("/connections")
        .as_array()
        .expect("array")
        .clone()
}

/// Records in the kernel map whose client is one of `clients`.
fn kernel_records_for(kernel: &Value, clients: &[SocketAddr]) -> usize {
    kernel["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| {
            clients
                .iter()
                .any(|c| r["client"].as_str() == Some(&c.to_string()))
        })
        .count()
}

#[test]
fn header_names_the_real_client_from_the_kernel_record() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let _gw = Gateway::new().start(&topo.gateway);

    let (local, response) = topo.client.run(|| async {
        let src = SocketAddr::new(Topology::client_v4(0), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        let r = conn.get("/hello?x=1", &[]).await;
        (conn.local, r)
    });
    assert_eq!(response.status, 200);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let ids = seen[0].all("jespa-connection-id");
    assert_eq!(ids.len(), 1, "exactly one id header: {ids:?}");
    assert!(
        ids[0].starts_with(&format!("{local}/")),
        "id {} should start with the client {local}",
        ids[0]
    );
    assert!(ids[0].len() > local.to_string().len() + 8, "id has a uid");
    assert_eq!(seen[0].path, "/hello?x=1");
    assert_eq!(seen[0].all("x-forwarded-for"), vec![local.ip().to_string()]);
    assert_eq!(
        seen[0].all("forwarded"),
        vec![format!("for=\"{local}\";proto=http")]
    );
    assert_eq!(seen[0].peer.ip().to_string(), "198.18.2.1");
}

#[test]
fn identity_source_is_the_kernel_record_while_the_connection_is_open() {
    let topo = Topology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new().start(&topo.gateway);
    let admin = gw.admin.clone();

    topo.client.run(move || async move {
        let src = SocketAddr::new(Topology::client_v4(1), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        assert_eq!(conn.get("/", &[]).await.status, 200);
        let local = conn.local;
        // Ask the admin endpoint while this connection is open.
        let rows: Value = tokio::task::spawn_blocking(move || admin.json("/connections"))
            .await
            .expect("admin query");
        let row = rows
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["client"] == local.to_string())
            .unwrap_or_else(|| panic!("no row for {local} in {rows:#}"))
            .clone();
        assert_eq!(row["identity_source"], "kernel");
        assert_eq!(row["learned_from"], "peer");
        assert_eq!(row["peer"], local.to_string());
        // Taken from the kernel's record (the gateway asks the socket only in the fallback).
        assert_eq!(row["local"], Topology::gateway_addr().to_string());
        assert_eq!(row["listener"], Topology::gateway_addr().to_string());
        assert_eq!(row["backend"], Topology::backend_addr().to_string());
        assert!(row["cookie"].as_u64().is_some());
        // By default the table names the connection by a keyed hash, never by its id.
        let hash = row["id_hash"].as_str().expect("id_hash");
        assert!(
            hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{row:#}"
        );
        assert!(row.get("id").is_none(), "full id shown by default: {row:#}");
        conn.close().await;
    });
    drop(gw);
}

#[test]
fn same_client_ip_and_port_twice_gets_different_ids() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let _gw = Gateway::new().start(&topo.gateway);

    let src = SocketAddr::new(Topology::client_v4(2), 40_000);
    topo.client.run(move || async move {
        for _ in 0..2 {
            let status = get_then_reset(src, Topology::gateway_addr(), "/").await;
            assert_eq!(status, 200);
        }
    });
    let ids: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| s.all("jespa-connection-id").remove(0))
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.iter().all(|id| id.starts_with("198.18.1.12:40000/")),
        "{ids:?}"
    );
    assert_ne!(ids[0], ids[1], "a reused ip:port must get a new id");
}

#[test]
fn client_sent_identity_headers_never_reach_the_backend() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let _gw = Gateway::new().start(&topo.gateway);

    let local = topo.client.run(|| async {
        let src = SocketAddr::new(Topology::client_v4(3), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        let forged = [
            ("Jespa-Connection-Id", "198.18.1.99:1/victim"),
            ("jespa_connection_id", "198.18.1.99:1/victim"),
            ("JESPA.CONNECTION.ID", "198.18.1.99:1/victim"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X_Forwarded_For", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
            ("X-Real-IP", "203.0.113.9"),
        ];
        assert_eq!(conn.get("/", &forged).await.status, 200);
        conn.local
    });
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    for (name, value) in &seen[0].headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains("victim") && !value.contains("203.0.113.9"),
            "client-supplied {name}: {value} reached the backend"
        );
    }
    let ids = seen[0].all("jespa-connection-id");
    assert_eq!(ids.len(), 1);
    assert!(ids[0].starts_with(&format!("{local}/")));
}

#[test]
fn upstream_connections_are_shared_and_every_request_carries_its_own_clients_id() {
    const CLIENTS: u8 = 8;
    const REQUESTS: usize = 5;
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new().start(&topo.gateway);

    let locals = topo.client.run(|| async {
        let mut conns = Vec::new();
        for i in 0..CLIENTS {
            let src = SocketAddr::new(Topology::client_v4(10 + i), 0);
            conns.push(Connection::open(Some(src), Topology::gateway_addr()).await);
        }
        // Interleave the clients' requests so that pooled upstream connections change hands.
        for round in 0..REQUESTS {
            for conn in conns.iter_mut() {
                let path = format!("/c/{}/{round}", conn.local);
                let r = conn.get(&path, &[]).await;
                assert_eq!(r.status, 200);
            }
        }
        let locals: Vec<SocketAddr> = conns.iter().map(|c| c.local).collect();
        for c in conns {
            c.close().await;
        }
        locals
    });

    let seen = backend.seen();
    assert_eq!(seen.len(), CLIENTS as usize * REQUESTS);
    let mut id_of_client: HashMap<String, String> = HashMap::new();
    for s in &seen {
        let client = s
            .path
            .split('/')
            .nth(2)
            .expect("client in path")
            .to_string();
        let ids = s.all("jespa-connection-id");
        assert_eq!(ids.len(), 1);
        assert!(
            ids[0].starts_with(&format!("{client}/")),
            "{} carried {}",
            s.path,
            ids[0]
        );
        let first = id_of_client.entry(client).or_insert_with(|| ids[0].clone());
        assert_eq!(first, &ids[0], "one client connection keeps one id");
    }
    assert_eq!(id_of_client.len(), CLIENTS as usize);
    let distinct: std::collections::HashSet<_> = id_of_client.values().collect();
    assert_eq!(distinct.len(), CLIENTS as usize);
    let upstream = backend.tcp_connections();
    assert!(
        upstream < CLIENTS as usize,
        "{upstream} upstream connections for {CLIENTS} clients: the pool is not shared"
    );

    // After every client closed, the kernel forgets them. The program removes a record and then
    // counts the removal, so both are awaited: a reading between the two sees one count short.
    let kernel = gw.wait_for_kernel("the kernel map to forget the closed clients", |k| {
        kernel_records_for(k, &locals) == 0
            && k["counters"]["deleted"].as_u64().unwrap_or(0) >= CLIENTS as u64
    });
    assert!(kernel["counters"]["recorded"].as_u64().expect("recorded") >= CLIENTS as u64);
    assert_eq!(kernel["counters"]["insert_failed"], 0);
}

#[test]
fn ipv6_clients_and_ipv4_clients_of_a_dual_stack_listener() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let _gw = Gateway::new()
        .listen(Topology::gateway_addr())
        .listen("[::]:8090".parse().expect("address"))
        .start(&topo.gateway);
    let (v6_local, v4_local) = topo.client.run(|| async {
        let src6 = SocketAddr::new(Topology::client_v6(0), 0);
        let gw6 = SocketAddr::new(Topology::gateway_addr_v6().ip(), 8090);
        let mut c6 = Connection::open(Some(src6), gw6).await;
        assert_eq!(c6.get("/v6", &[]).await.status, 200);
        let src4 = SocketAddr::new(Topology::client_v4(4), 0);
        let gw4 = SocketAddr::new(Topology::gateway_addr().ip(), 8090);
        let mut c4 = Connection::open(Some(src4), gw4).await;
        assert_eq!(c4.get("/v4", &[]).await.status, 200);
        (c6.local, c4.local)
    });
    let seen = backend.seen();
    let id_for = |path: &str| {
        seen.iter()
            .find(|s| s.path == path)
            .map(|s| s.all("jespa-connection-id").remove(0))
            .expect("request seen")
    };
    let id6 = id_for("/v6");
    assert!(
        id6.starts_with(&format!("[{}]:{}/", v6_local.ip(), v6_local.port())),
        "{id6}"
    );
    let id4 = id_for("/v4");
    assert!(
        id4.starts_with(&format!("{v4_local}/")),
        "a v4-mapped client shows as IPv4: {id4}"
    );
}

#[test]
fn ebpf_off_uses_the_peer_address_and_says_so() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new().ebpf("off").start(&topo.gateway);
    assert!(
        gw.wait_for_line("eBPF off", scaled(Duration::from_secs(1)))
            .is_some()
    );
    let admin = gw.admin.clone();
    let local = topo.client.run(move || async move {
        let src = SocketAddr::new(Topology::client_v4(5), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        assert_eq!(conn.get("/", &[]).await.status, 200);
        let rows: Value = tokio::task::spawn_blocking(move || admin.json("/connections"))
            .await
            .expect("admin");
        assert_eq!(rows[0]["identity_source"], "fallback");
        conn.local
    });
    let ids = backend.seen()[0].all("jespa-connection-id");
    assert!(ids[0].starts_with(&format!("{local}/")));
    assert_eq!(gw.admin_json("/kernel")["ebpf"], "off");
    let _ = connections(&gw);
}

#[test]
fn without_privilege_required_refuses_to_start_and_auto_falls_back() {
    let topo = Topology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let unprivileged = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ];
    let unprivileged = Gateway::new().wrapper(&unprivileged);
    match unprivileged.clone().try_start(&topo.gateway) {
        Started::Ready(_) => panic!("--ebpf required started without privileges"),
        Started::Exited { status, log } => {
            assert_eq!(status.code(), Some(69), "{log:?}");
            let text = log.join("\n");
            assert!(text.contains("--ebpf required"), "{text}");
            assert!(
                text.contains("root") || text.contains("CAP_BPF"),
                "the message names the missing privilege: {text}"
            );
        }
    }

    let Started::Ready(gw) = unprivileged.ebpf("auto").try_start(&topo.gateway) else {
        panic!("--ebpf auto must start without privileges");
    };
    let warnings: Vec<String> = gw
        .log()
        .into_iter()
        .filter(|l| l.contains("eBPF unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "one clear warning: {:?}", gw.log());
    assert!(warnings[0].contains("falling back"));
    assert!(
        gw.admin_json("/kernel")["ebpf"]
            .as_str()
            .expect("status")
            .starts_with("unavailable")
    );
}

#[test]
fn two_instances_do_not_see_each_others_connections() {
    let topo_a = Topology::new();
    let topo_b = Topology::new();
    let _backend_a = Backend::start(&topo_a.backend, Topology::backend_addr());
    let _backend_b = Backend::start(&topo_b.backend, Topology::backend_addr());
    let gw_a = Gateway::new().start(&topo_a.gateway);
    let gw_b = Gateway::new().start(&topo_b.gateway);
    let recorded = |gw: &Gateway| {
        gw.admin_json("/kernel")["counters"]["recorded"]
            .as_u64()
            .expect("n")
    };
    let before_a = recorded(&gw_a);
    topo_b.client.run(|| async {
        for i in 0..3 {
            let src = SocketAddr::new(Topology::client_v4(20 + i), 0);
            let mut c = Connection::open(Some(src), Topology::gateway_addr()).await;
            assert_eq!(c.get("/", &[]).await.status, 200);
            c.close().await;
        }
    });
    // B recorded its three clients; A nothing (its admin endpoint is a unix socket, not TCP).
    assert!(recorded(&gw_b) >= 3);
    assert_eq!(
        recorded(&gw_a),
        before_a,
        "A counted none of B's connections"
    );
    let a_records = gw_a.admin_json("/kernel")["records"].clone();
    assert!(
        a_records
            .as_array()
            .expect("records")
            .iter()
            .all(|r| !r["client"]
                .as_str()
                .expect("client")
                .starts_with("198.18.1.3")),
        "A holds B's clients: {a_records:#}"
    );
}

#[test]
fn a_dead_backend_gives_502_and_a_log_line_naming_it() {
    let topo = Topology::new();
    // No backend started: connections to it are refused.
    let gw = Gateway::new().start(&topo.gateway);
    let status = topo.client.run(|| async {
        let src = SocketAddr::new(Topology::client_v4(6), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        conn.get("/", &[]).await.status
    });
    assert_eq!(status, 502);
    let line = gw
        .wait_for_line("backend request failed", scaled(Duration::from_secs(5)))
        .expect("a log line");
    assert!(
        line.contains(&Topology::backend_addr().to_string()),
        "{line}"
    );
    assert!(
        line.to_lowercase().contains("refused"),
        "names the cause: {line}"
    );
}

#[test]
fn stopping_removes_the_programs_and_the_cgroup() {
    let topo = Topology::new();
    let gw = Gateway::new().start(&topo.gateway);
    let kernel = gw.admin_json("/kernel");
    let cgroup = kernel["cgroup"].as_str().expect("cgroup path").to_string();
    assert!(std::path::Path::new(&cgroup).is_dir());
    let status = gw.stop();
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(&cgroup).exists(),
        "{cgroup} left behind after a clean stop"
    );
}

#[test]
fn request_and_response_bodies_stream_through() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let _gw = Gateway::new().start(&topo.gateway);
    let body = bytes::Bytes::from(vec![b'x'; 4 << 20]);
    let status = topo.client.run(move || async move {
        let src = SocketAddr::new(Topology::client_v4(7), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        let r = conn
            .send("POST", "/upload", &[("expect", "100-continue")], body)
            .await;
        // The same connection stays usable after a large body.
        assert_eq!(conn.get("/after", &[]).await.status, 200);
        r.status
    });
    assert_eq!(status, 200);
    let seen = backend.seen();
    assert_eq!(seen[0].path, "/upload");
    assert_eq!(seen[0].body_len, 4 << 20);
    assert_eq!(seen[1].path, "/after");
}
