//! Real NTLM through the gateway: `curl --ntlm` clients, the NTLMv2 test acceptor as backends, in
//! `tag` mode (acceptor keyed by the connection-id header) and `pin` mode (keyed by its own TCP
//! connection, like IIS).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, Keying, curl_ntlm},
    fixtures,
    gateway::{Gateway, Mode},
    metrics::sample,
    topology::Topology,
    wait::{eventually_within, scaled},
};

const USERS: usize = 16;
const REQUESTS_PER_CONNECTION: usize = 6;

fn users() -> Vec<(String, String)> {
    acceptor::numbered_users(USERS)
}

fn urls(user: usize) -> Vec<String> {
    (0..REQUESTS_PER_CONNECTION)
        .map(|r| Topology::url(&format!("/u{user}/r{r}")))
        .collect()
}

/// Every user logs in concurrently, each on one connection with several requests; every response
/// must be for that user.
fn all_users_log_in_concurrently(topo: &Topology) {
    let users = users();
    std::thread::scope(|scope| {
        let runs: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(i, (user, password))| {
                let source = Topology::client_v4(i as u8);
                let urls = urls(i);
                let handle = scope
                    .spawn(move || curl_ntlm(&topo.client, source, user, password, &urls, &[]));
                (user, handle)
            })
            .collect();
        for (user, handle) in runs {
            let run = handle.join().expect("curl thread");
            assert!(run.success, "{user}: {}", run.stderr);
            assert_eq!(
                run.users(),
                vec![user.clone(); REQUESTS_PER_CONNECTION],
                "every response on {user}'s connection is for {user}: {}",
                run.stdout
            );
        }
    });
}

#[test]
fn sixteen_users_in_tag_mode_share_upstream_connections_and_each_gets_their_own_identity() {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Header);
    // Without a cap the pool grows to the peak number of requests in flight (16 at worst here);
    // with one, it is bounded however the 16 concurrent logins interleave.
    let gw = Gateway::new()
        .backend(&a)
        .backend(&b)
        .mode(Mode::Tag)
        .args(&["--max-upstream-per-backend", "4"])
        .start(&topo.gateway);
    all_users_log_in_concurrently(&topo);

    let requests: Vec<_> = a.requests().into_iter().chain(b.requests()).collect();
    // Each user: 2 handshake legs + REQUESTS_PER_CONNECTION answers (the first of which completes it).
    assert!(requests.len() >= USERS * REQUESTS_PER_CONNECTION);
    // The cap is 4 per backend; a connection being returned to the pool as the next request takes
    // the freed permit may make the pool open one more now and then, never one per client.
    let upstream = a.tcp_connections() + b.tcp_connections();
    assert!(
        upstream < USERS,
        "{upstream} upstream connections for {USERS} client connections: the pool is not shared"
    );
    // Both backends were used, and each client connection stayed on one backend.
    assert!(!a.requests().is_empty() && !b.requests().is_empty());
    let mut backend_of_id: HashMap<String, SocketAddr> = HashMap::new();
    for (acceptor, r) in a
        .requests()
        .into_iter()
        .map(|r| (a.addr, r))
        .chain(b.requests().into_iter().map(|r| (b.addr, r)))
    {
        let id = r["conn_id"].as_str().expect("stamped").to_string();
        let first = backend_of_id.entry(id.clone()).or_insert(acceptor);
        assert_eq!(*first, acceptor, "connection {id} moved between backends");
    }
    assert_eq!(backend_of_id.len(), USERS, "one id per client connection");
    let metrics = gw.admin_metrics();
    assert!(
        metrics.contains("ntlm_tag_ntlm_messages_total{type=\"authenticate\"} 16"),
        "{metrics}"
    );
    // Sharing authenticated connections is an explicit choice, and the log says when it is safe.
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("mode = \"tag\"") && l.contains("Jespa")),
        "tag mode warns at start-up"
    );
}

#[test]
fn pin_mode_never_lets_an_upstream_connection_serve_two_clients() {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Connection);
    let gw = Gateway::new()
        .backend(&a)
        .backend(&b)
        .mode(Mode::Pin)
        .start(&topo.gateway);
    all_users_log_in_concurrently(&topo);

    for acceptor in [&a, &b] {
        // The acceptor's own log: which client connection ids each of its TCP connections carried.
        let mut ids_per_conn: HashMap<u64, HashSet<String>> = HashMap::new();
        for r in acceptor.requests() {
            ids_per_conn
                .entry(r["conn"].as_u64().expect("conn"))
                .or_default()
                .insert(
                    r["conn_id"]
                        .as_str()
                        .expect("stamped in pin mode too")
                        .to_string(),
                );
        }
        for (conn, ids) in &ids_per_conn {
            assert_eq!(ids.len(), 1, "upstream connection {conn} served {ids:?}");
        }
    }
    assert_eq!(a.tcp_connections() + b.tcp_connections(), USERS);
    // When the clients are gone, so are their pinned upstream connections.
    gw.wait_for_metrics("no pinned connection left open", |m| {
        m.contains("ntlm_tag_pinned_connections 0")
    });
}

#[test]
fn a_wrong_password_is_refused_through_the_gateway() {
    let topo = Topology::new();
    let a = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Header,
    );
    let _gw = Gateway::new().backend(&a).start(&topo.gateway);
    let run = curl_ntlm(
        &topo.client,
        Topology::client_v4(0),
        "user00",
        "wrong",
        &urls(0)[..1],
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(run.stdout, "401");
}

/// Each handshake that ends at the backend is timed under its result: one refused login and one
/// accepted login, each on a connection of its own, against an IIS-like backend (default mode).
#[test]
fn every_handshake_that_ends_is_timed_under_its_result() {
    let topo = Topology::new();
    let a = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Connection,
    );
    let gw = Gateway::new().backend(&a).start(&topo.gateway);
    for (password, status) in [("wrong", "401"), ("Secret-0!", "200")] {
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4(0),
            "user00",
            password,
            &urls(0)[..1],
            &["-o", "/dev/null", "-w", "%{http_code}"],
        );
        assert_eq!(run.stdout, status, "{}", run.stderr);
    }
    let count = |m: &str, result: &str| {
        sample(
            m,
            "ntlm_tag_ntlm_handshake_duration_seconds_count",
            &format!("result=\"{result}\""),
        )
    };
    let metrics = gw.admin_metrics();
    assert_eq!(count(&metrics, "failed"), Some(1), "{metrics}");
    assert_eq!(count(&metrics, "authenticated"), Some(1), "{metrics}");
}

#[test]
fn when_a_backend_dies_new_handshakes_succeed_on_the_other_and_it_returns_after_health_checks() {
    let topo = Topology::new();
    let (mut a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Header);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{}\"]\nbackends = [\"{}\", \"{}\"]\nebpf = \"required\"\n\
             [health_check]\npath = \"/healthz\"\ninterval_secs = 0.2\ntimeout_secs = 0.5\n",
            Topology::gateway_addr(),
            a.addr,
            b.addr
        ),
    );
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    a.kill();
    assert!(
        gw.wait_for_line("health check failed", scaled(Duration::from_secs(10)))
            .is_some_and(|l| l.contains(&a.addr.to_string())),
        "the dead backend is noticed"
    );
    let before_b = b.requests().len();
    // Users `which`, each from their own address: two requests on one connection, both theirs.
    let log_in = |which: std::ops::Range<usize>| {
        for i in which {
            let (user, password) = &users()[i];
            let run = curl_ntlm(
                &topo.client,
                Topology::client_v4(i as u8),
                user,
                password,
                &urls(i)[..2],
                &[],
            );
            assert_eq!(run.users(), vec![user.clone(); 2], "{}", run.stderr);
        }
    };
    log_in(0..6);
    assert!(
        b.requests().len() >= before_b + 6 * 3,
        "all went to the live backend"
    );

    let a2 = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Header,
    );
    assert!(
        gw.wait_for_line("health check passes again", scaled(Duration::from_secs(10)))
            .is_some(),
        "the backend returns"
    );
    log_in(6..12);
    assert!(
        a2.requests().iter().any(|r| r["path"] != "/healthz"),
        "the returned backend takes new connections again"
    );
}

#[test]
fn an_http2_client_attempting_ntlm_is_told_to_use_http11_and_then_succeeds() {
    let topo = Topology::new();
    let a = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Header,
    );
    let gw = Gateway::new()
        .backend(&a)
        .arg("--http2")
        .start(&topo.gateway);
    let run = curl_ntlm(
        &topo.client,
        Topology::client_v4(3),
        "user03",
        "Secret-3!",
        &urls(3)[..1],
        &["--http2-prior-knowledge", "-v"],
    );
    assert!(
        run.stderr.contains("HTTP_1_1_REQUIRED") || run.stderr.contains("HTTP/1.1 required"),
        "curl was told to use HTTP/1.1: {}",
        run.stderr
    );
    assert_eq!(run.users(), vec!["user03".to_string()], "{}", run.stderr);
    assert!(run.stderr.contains("HTTP/1.1 200"), "{}", run.stderr);
    // Plain HTTP/2 without NTLM is served over HTTP/2.
    let plain = std::process::Command::new("nsenter")
        .arg(format!("--net={}", topo.client.path().display()))
        .args([
            "--",
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %{content_type}",
        ])
        .arg(format!("http://{}/healthz", Topology::gateway_addr()))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "2 200 text/plain; charset=utf-8",
        "requests without NTLM are served over HTTP/2, with the backend's own fields"
    );
    drop(gw);
}

#[test]
fn in_pin_mode_a_dead_pinned_connection_closes_the_client_connection() {
    let topo = Topology::new();
    let mut a = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Connection,
    );
    let gw = Gateway::new()
        .backend(&a)
        .mode(Mode::Pin)
        .start(&topo.gateway);
    let dir = tempfile::tempdir().expect("temp dir");
    let body = dir.path().join("body");
    std::fs::write(&body, vec![b'x'; 64 * 1024]).expect("body");
    let url = format!("http://{}/", Topology::gateway_addr());
    let client_ns = topo.client.path();
    let body_arg = format!("@{}", body.display());
    // user00 authenticates, then uploads slowly on the same (pinned) connection.
    let curl = std::thread::spawn(move || {
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", client_ns.display()))
            .args([
                "--",
                "curl",
                "-s",
                "--max-time",
                "30",
                "-w",
                "%{http_code}\n",
            ])
            .args(["--ntlm", "-u", "user00:Secret-0!", "-o", "/dev/null"])
            .arg(format!("{url}first"))
            .args([
                "--next",
                "-w",
                "%{http_code}\n",
                "--ntlm",
                "-u",
                "user00:Secret-0!",
            ])
            .args([
                "-o",
                "/dev/null",
                "--limit-rate",
                "16K",
                "--data-binary",
                &body_arg,
            ])
            .arg(format!("{url}upload"))
            .output()
            .expect("curl")
    });
    // Kill the backend once the upload has begun: curl starts it only after `/first` (its Type 1 and
    // Type 3 requests, the latter authenticated as user00) was answered, so that 200 is through.
    // (Killing it as soon as the backend had *decided* the 200 raced the response on slow
    // machines: 502 for both.) The gateway counts a request when its head arrives.
    eventually_within(
        "the upload to start (requests started, connection table, backend's requests)",
        scaled(Duration::from_secs(30)),
        || {
            let rows = gw.admin_json("/connections");
            let started = rows
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["requests"].as_u64())
                .max()
                .unwrap_or(0);
            (started, rows, a.requests())
        },
        |(started, _, _)| *started >= 3,
    );
    a.kill();
    let out = curl.join().expect("curl thread");
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(codes.lines().collect::<Vec<_>>(), ["200", "502"], "{codes}");
    let line = gw
        .wait_for_line(
            "pinned to this client's NTLM session",
            scaled(Duration::from_secs(5)),
        )
        .expect("the lost session is logged");
    assert!(line.contains("closing the client connection"), "{line}");
}

#[test]
fn several_www_authenticate_values_and_the_401_body_reach_the_client_in_order() {
    let topo = Topology::new();
    let a = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Header,
    );
    let _gw = Gateway::new().backend(&a).start(&topo.gateway);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", topo.client.path().display()))
        .args(["--", "curl", "-s", "-i", "--max-time", "10"])
        .arg(format!("http://{}/private", Topology::gateway_addr()))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 401"), "{text}");
    let challenges: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("www-authenticate:"))
        .map(str::trim)
        .collect();
    assert_eq!(challenges, ["negotiate", "ntlm"], "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(!body.is_empty(), "the 401 body is passed on: {text}");
}
