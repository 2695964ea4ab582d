//! Upstream connection handling in the default configuration: NTLM sessions with backends that
//! authenticate their own TCP connection (the acceptor keyed by connection, like IIS), shared
//! connections that wait for a request body the backend answered early, and requests that fail
//! over when a backend dies.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::mpsc,
    time::Duration,
};

use ntlm_tag_tests::{
    acceptor::{self, Keying, curl_ntlm},
    backends::scripted::{Script, ScriptedBackend},
    client::Connection,
    gateway::Gateway,
    metrics::sample,
    netns::NetNs,
    raw::{self, RawClient},
    topology::Topology,
    wait::{eventually, scaled},
};

const USERS: usize = 8;
const REQUESTS_PER_USER: usize = 4;
const ANONYMOUS_CLIENTS: usize = 16;
const ANONYMOUS_REQUESTS: usize = 3;

fn users() -> Vec<(String, String)> {
    acceptor::numbered_users(USERS)
}

/// A client without credentials: several requests on one keep-alive connection; their statuses.
fn anonymous_statuses(ns: &NetNs, i: usize) -> Vec<String> {
    let source = Topology::client_v4((USERS + i % 20) as u8).to_string();
    let mut cmd = ns.command("curl");
    cmd.args(["-sS", "--max-time", "20", "--interface", &source]);
    cmd.args(["-w", "%{http_code}\n"]);
    for r in 0..ANONYMOUS_REQUESTS {
        cmd.args(["-o", "/dev/null"])
            .arg(Topology::url(&format!("/anon{i}/r{r}")));
    }
    let out = cmd.output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn behind_the_default_configuration_iis_like_backends_serve_every_user_as_themselves_and_clients_without_credentials_as_nobody()
 {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Connection);
    let gw = Gateway::new().backend(&a).backend(&b).start(&topo.gateway);

    let anonymous_during = std::thread::scope(|scope| {
        let logins: Vec<_> = users()
            .into_iter()
            .enumerate()
            .map(|(i, (user, password))| {
                let topo = &topo;
                scope.spawn(move || {
                    let urls: Vec<String> = (0..REQUESTS_PER_USER)
                        .map(|r| Topology::url(&format!("/u{i}/r{r}")))
                        .collect();
                    let run = curl_ntlm(
                        &topo.client,
                        Topology::client_v4(i as u8),
                        &user,
                        &password,
                        &urls,
                        &[],
                    );
                    (user, run)
                })
            })
            .collect();
        // Credential-less clients arrive while the users log in.
        let anonymous: Vec<_> = (0..ANONYMOUS_CLIENTS / 2)
            .map(|i| {
                let topo = &topo;
                scope.spawn(move || anonymous_statuses(&topo.client, i))
            })
            .collect();
        let wrong: Vec<String> = logins
            .into_iter()
            .map(|login| login.join().expect("curl thread"))
            .filter(|(user, run)| {
                !run.success || run.users() != vec![user.clone(); REQUESTS_PER_USER]
            })
            .map(|(user, run)| format!("{user}: {} {}", run.stdout, run.stderr))
            .collect();
        let anonymous: Vec<Vec<String>> = anonymous
            .into_iter()
            .map(|h| h.join().expect("curl thread"))
            .collect();
        (wrong, anonymous)
    });
    let (wrong_users, anonymous_during) = anonymous_during;
    // And after them, when every upstream connection an NTLM login used would be idle.
    let anonymous_after: Vec<Vec<String>> = (ANONYMOUS_CLIENTS / 2..ANONYMOUS_CLIENTS)
        .map(|i| anonymous_statuses(&topo.client, i))
        .collect();
    let served_anonymously: Vec<String> = anonymous_during
        .iter()
        .chain(&anonymous_after)
        .flatten()
        .filter(|status| *status != "401")
        .cloned()
        .collect();
    assert!(
        wrong_users.is_empty() && served_anonymously.is_empty(),
        "every user sees only themselves ({} of {USERS} did not: {wrong_users:#?}) and every \
         credential-less request gets 401 ({} of {} did not: {served_anonymously:?})",
        wrong_users.len(),
        served_anonymously.len(),
        ANONYMOUS_CLIENTS * ANONYMOUS_REQUESTS,
    );
    assert_eq!(
        anonymous_during.len() + anonymous_after.len(),
        ANONYMOUS_CLIENTS,
        "every credential-less client ran"
    );
    for statuses in anonymous_during.iter().chain(&anonymous_after) {
        assert_eq!(statuses.len(), ANONYMOUS_REQUESTS, "{statuses:?}");
    }

    // What the backends saw: from its first NTLM leg on, an upstream connection carried one client
    // connection's requests only (before it, it may have served anonymous requests of others).
    // (Each acceptor's log is read from its output by a thread of its own.)
    let logged = USERS * (REQUESTS_PER_USER + 1) + ANONYMOUS_CLIENTS * ANONYMOUS_REQUESTS;
    eventually(
        "the acceptors to log every request",
        || a.requests().len() + b.requests().len(),
        |n| *n >= logged,
    );
    for acceptor in [&a, &b] {
        let mut after_leg: HashMap<u64, HashSet<String>> = HashMap::new();
        for r in acceptor.requests() {
            let conn = r["conn"].as_u64().expect("conn");
            if r["authorization"].is_string() || after_leg.contains_key(&conn) {
                after_leg
                    .entry(conn)
                    .or_default()
                    .insert(r["conn_id"].as_str().expect("stamped").to_string());
            }
        }
        for (conn, ids) in &after_leg {
            assert_eq!(
                ids.len(),
                1,
                "upstream connection {conn} of {} carried NTLM for {ids:?}",
                acceptor.addr
            );
        }
    }
    let m = eventually(
        "the bound connections to close with their clients",
        || gw.admin_metrics(),
        |m| sample(m, "ntlm_tag_bound_connections", "") == Some(0),
    );
    assert_eq!(
        sample(
            &m,
            "ntlm_tag_upstream_bindings_total",
            "trigger=\"request\""
        ),
        Some(USERS as u64),
        "one binding per login: {m}"
    );

    // The connection table says which client connection has a bound upstream connection.
    let rows = topo.client.run({
        let gw_admin = gw.admin.clone();
        move || async move {
            let gateway = Topology::gateway_addr();
            let mut leg =
                Connection::open(Some(SocketAddr::new(Topology::client_v4(0), 0)), gateway).await;
            let mut anonymous =
                Connection::open(Some(SocketAddr::new(Topology::client_v4(1), 0)), gateway).await;
            let type1 = "NTLM TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=";
            let challenged = leg.get("/leg", &[("authorization", type1)]).await;
            assert_eq!(challenged.status, 401);
            assert_eq!(anonymous.get("/anon", &[]).await.status, 401);
            let locals = (leg.local, anonymous.local);
            // The admin socket is a file: reachable from this namespace, read while both are open.
            let rows = gw_admin.get("/connections", &[]).body;
            (locals, rows)
        }
    });
    let ((leg, anonymous), rows) = rows;
    let rows: serde_json::Value = serde_json::from_str(&rows).expect("JSON");
    let link = |local: SocketAddr| {
        rows.as_array()
            .into_iter()
            .flatten()
            .find(|r| r["client"] == local.to_string())
            .map(|r| r["upstream"].clone())
    };
    assert_eq!(link(leg), Some("bound".into()), "{rows:#}");
    assert_eq!(link(anonymous), Some("shared".into()), "{rows:#}");
}

const GET: &[u8] = b"GET /other HTTP/1.1\r\nHost: gateway.test\r\n\r\n";

/// One GET from client address `i` on a new connection; the statuses that came back.
fn get_on_a_new_connection(ns: &NetNs, i: u8) -> Vec<u16> {
    ns.run(move || async move {
        let mut c = RawClient::connect(Topology::client_v4(i), Topology::gateway_addr()).await;
        c.send(GET).await.expect("send");
        c.read_until(scaled(Duration::from_secs(10)), |r| !r.is_empty())
            .await
            .statuses()
    })
}
const BODY: usize = 64 * 1024;
const FIRST_PART: usize = 1000;

fn post_head() -> String {
    format!("POST /upload HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: {BODY}\r\n\r\n")
}

#[test]
fn a_post_answered_401_before_its_body_keeps_its_upstream_connection_out_of_the_pool_until_the_body_is_sent()
 {
    let topo = Topology::new();
    let backend = ScriptedBackend::start(
        &topo.backend,
        Topology::backend_addr(),
        Script::AnswerBeforeBody,
    );
    let gw = Gateway::new().backend(&backend).start(&topo.gateway);

    // A client posts, is answered 401 before the backend read its body, and stalls the body until
    // the test releases it.
    let (answered_tx, answered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let stalled = topo.client.spawn(move || async move {
        let mut c = RawClient::connect(Topology::client_v4(0), Topology::gateway_addr()).await;
        c.send(post_head().as_bytes()).await.expect("head");
        c.send(&[b'a'; FIRST_PART]).await.expect("first part");
        let first = c
            .read_until(scaled(Duration::from_secs(10)), |r| !r.is_empty())
            .await;
        answered_tx.send(first.statuses()).expect("test waiting");
        release_rx.recv().expect("release");
        c.send(&[b'a'; BODY - FIRST_PART]).await.expect("the rest");
        c.send(GET).await.expect("a request after it");
        let all = c
            .read_until(scaled(Duration::from_secs(10)), |r| r.len() >= 2)
            .await;
        all.statuses()
    });
    let early = answered_rx
        .recv_timeout(scaled(Duration::from_secs(10)))
        .expect("the stalled client's answer");
    assert_eq!(early, [401]);

    // While that body is stalled, other clients are served (on another upstream connection).
    for i in 1..=5u8 {
        let statuses = get_on_a_new_connection(&topo.client, i);
        assert_eq!(
            statuses,
            [200],
            "client {i} is answered while another client's body is stalled"
        );
    }
    let conns = backend.connections();
    assert_eq!(
        conns[0].answered, 1,
        "the stalled POST's upstream connection served nothing else: {conns:#?}"
    );
    assert!(conns.len() >= 2, "{conns:#?}");

    // Released, the body is sent to its end, and the connection goes back to the pool.
    release_tx.send(()).expect("stalled client waiting");
    assert_eq!(stalled.join().expect("stalled client"), [401, 200]);

    // Another POST stalls its body the same way, holding one of the two pooled connections, so
    // the next request needs the other: the POST's first connection serves it (unless the
    // client's own GET above already did).
    let (answered_tx, answered_rx) = mpsc::channel();
    let (abandon_tx, abandon_rx) = mpsc::channel::<()>();
    let abandoning = topo.client.spawn(move || async move {
        let mut c = RawClient::connect(Topology::client_v4(10), Topology::gateway_addr()).await;
        c.send(post_head().as_bytes()).await.expect("head");
        c.send(&[b'b'; FIRST_PART]).await.expect("first part");
        let r = c
            .read_until(scaled(Duration::from_secs(10)), |r| !r.is_empty())
            .await;
        answered_tx.send(r.statuses()).expect("test waiting");
        abandon_rx.recv().expect("cue");
        c.reset();
    });
    let early = answered_rx
        .recv_timeout(scaled(Duration::from_secs(10)))
        .expect("the second stalled client's answer");
    assert_eq!(early, [401]);
    let statuses = get_on_a_new_connection(&topo.client, 11);
    assert_eq!(statuses, [200]);
    eventually(
        "the first POST's upstream connection to serve again",
        || backend.connections(),
        |c| c[0].answered >= 2 && c[0].received >= post_head().len() + BODY,
    );

    // A client that abandons its body takes that upstream connection down with it.
    abandon_tx.send(()).expect("abandoning client waiting");
    abandoning.join().expect("abandoning client");
    let conns = eventually(
        "the abandoned body's upstream connection to be closed",
        || backend.connections(),
        |c| c.iter().any(|c| c.closed_by_gateway),
    );
    assert_eq!(
        conns.iter().filter(|c| c.closed_by_gateway).count(),
        1,
        "only the abandoned body's connection is closed: {conns:#?}"
    );
    // The others still serve.
    let statuses = get_on_a_new_connection(&topo.client, 12);
    assert_eq!(statuses, [200]);
    drop(gw);
}

#[test]
fn after_one_of_two_backends_is_killed_every_new_ntlm_handshake_succeeds_on_the_other() {
    const HANDSHAKES: usize = 20;
    let topo = Topology::new();
    let (mut a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Connection);
    let gw = Gateway::new().backend(&a).backend(&b).start(&topo.gateway);
    // Both backends serve logins first.
    for i in 0..2 {
        let (user, password) = &users()[i];
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4(i as u8),
            user,
            password,
            &[Topology::url("/warm-up")],
            &[],
        );
        assert_eq!(run.users(), vec![user.clone()], "{}", run.stderr);
    }
    eventually(
        "both backends to log a login",
        || (a.requests().len(), b.requests().len()),
        |(x, y)| *x > 0 && *y > 0,
    );

    a.kill(); // SIGKILL: no goodbye, its port refuses connections from now on.
    let mut succeeded = 0;
    let mut failures = Vec::new();
    for i in 0..HANDSHAKES {
        let (user, password) = &users()[i % USERS];
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4((i % 20) as u8),
            user,
            password,
            &[
                Topology::url(&format!("/after/{i}/a")),
                Topology::url(&format!("/after/{i}/b")),
            ],
            &[],
        );
        if run.success && run.users() == [user.clone(), user.clone()] {
            succeeded += 1;
        } else {
            failures.push(format!("{i}: {} {}", run.stdout, run.stderr));
        }
    }
    assert_eq!(succeeded, HANDSHAKES, "failed handshakes: {failures:#?}");
    let m = gw.admin_metrics();
    assert!(
        sample(&m, "ntlm_tag_upstream_failovers_total", "").is_some_and(|n| n >= 1),
        "a request that reached the dead backend's refused port moved on: {m}"
    );
    let line = gw
        .wait_for_line("never reached the backend", scaled(Duration::from_secs(5)))
        .expect("the move is logged");
    assert!(line.contains(&a.addr.to_string()), "{line}");
    // Every request after the kill was answered by the live backend (its log may lag a little).
    eventually(
        "the live backend to log every request after the kill",
        || {
            b.requests()
                .iter()
                .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/after/")))
                .filter(|r| r["user"].is_string())
                .count()
        },
        |n| *n == HANDSHAKES * 2,
    );
}

#[test]
fn a_response_with_persistent_auth_binds_its_upstream_connection_to_that_client_connection() {
    let topo = Topology::new();
    let backend = ScriptedBackend::start(
        &topo.backend,
        Topology::backend_addr(),
        Script::AnswerPersistentAuth,
    );
    let gw = Gateway::new().backend(&backend).start(&topo.gateway);
    // Client A: two requests on one connection, which stays open until the test ends it.
    let (answered_tx, answered_rx) = mpsc::channel();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let client_a = topo.client.spawn(move || async move {
        let mut c = RawClient::connect(Topology::client_v4(0), Topology::gateway_addr()).await;
        c.send(GET).await.expect("first");
        c.read_until(scaled(Duration::from_secs(10)), |r| !r.is_empty())
            .await;
        c.send(GET).await.expect("second");
        let r = c
            .read_until(scaled(Duration::from_secs(10)), |r| r.len() >= 2)
            .await;
        answered_tx
            .send((c.local, r.statuses()))
            .expect("test waiting");
        close_rx.recv().expect("cue");
    });
    let (a_local, statuses) = answered_rx
        .recv_timeout(scaled(Duration::from_secs(10)))
        .expect("client A's answers");
    assert_eq!(statuses, [200, 200]);
    // (The backend counts an answer once it has written it.)
    let conns = eventually(
        "the backend to count both answers",
        || backend.connections(),
        |c| c.iter().map(|c| c.answered).sum::<usize>() == 2,
    );
    assert_eq!(
        (conns.len(), conns[0].answered),
        (1, 2),
        "A's requests on one upstream connection: {conns:#?}"
    );

    // Client B, while A is connected, never gets A's upstream connection.
    let statuses = get_on_a_new_connection(&topo.client, 1);
    assert_eq!(statuses, [200]);
    let conns = backend.connections();
    assert_eq!(
        conns.len(),
        2,
        "B got an upstream connection of its own: {conns:#?}"
    );
    assert_eq!(
        conns[0].answered, 2,
        "A's connection served only A: {conns:#?}"
    );

    let rows = gw.admin_json("/connections");
    let a_row = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["client"] == a_local.to_string())
        .unwrap_or_else(|| panic!("A in {rows:#}"));
    assert_eq!(a_row["upstream"], "bound", "{rows:#}");
    let m = gw.admin_metrics();
    assert_eq!(
        sample(
            &m,
            "ntlm_tag_upstream_bindings_total",
            "trigger=\"response\""
        ),
        Some(2),
        "{m}"
    );

    // Closed with its client connection.
    close_tx.send(()).expect("client A waiting");
    client_a.join().expect("client A");
    eventually(
        "A's bound upstream connection to close with it",
        || backend.connections(),
        |c| c[0].closed_by_gateway,
    );
    eventually(
        "no bound connections left",
        || gw.admin_metrics(),
        |m| sample(m, "ntlm_tag_bound_connections", "") == Some(0),
    );
}

#[test]
fn when_the_backend_holding_a_bound_session_dies_the_client_gets_502_and_is_closed_never_moved() {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Connection);
    let gw = Gateway::new().backend(&a).backend(&b).start(&topo.gateway);
    let (challenged_tx, challenged_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let client = topo.client.spawn(move || async move {
        let mut c = RawClient::connect(Topology::client_v4(0), Topology::gateway_addr()).await;
        // An NTLM Type1: the backend's security context for this client starts here.
        c.send(
            b"GET /leg HTTP/1.1\r\nHost: gateway.test\r\n\
              Authorization: NTLM TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        )
        .await
        .expect("type1");
        let r = c
            .read_until(scaled(Duration::from_secs(10)), |r| !r.is_empty())
            .await;
        challenged_tx.send(r.statuses()).expect("test waiting");
        go_rx.recv().expect("cue");
        c.send(GET).await.expect("next request");
        c.read_until(scaled(Duration::from_secs(10)), |_| false)
            .await
    });
    let statuses = challenged_rx
        .recv_timeout(scaled(Duration::from_secs(10)))
        .expect("the challenge");
    assert_eq!(statuses, [401]);
    // (Each acceptor's log is read from its output by a thread of its own.)
    let (logged_a, _) = eventually(
        "an acceptor to log the Type1",
        || (a.requests().len(), b.requests().len()),
        |(x, y)| x + y == 1,
    );
    let (mut holding, other) = if logged_a == 0 { (b, a) } else { (a, b) };
    holding.kill();
    go_tx.send(()).expect("client waiting");
    let reply = client.join().expect("client");
    assert_eq!(reply.statuses(), [401, 502], "{}", reply.text());
    assert_eq!(
        reply.responses[1].all("connection"),
        ["close"],
        "{}",
        reply.text()
    );
    assert_eq!(
        reply.end,
        raw::End::Closed,
        "the client connection is closed: it must authenticate again"
    );
    assert!(
        other.requests().iter().all(|r| r["path"] != "/other"),
        "never carried on silently on the other backend: {:?}",
        other.requests()
    );
    let line = gw
        .wait_for_line(
            "bound to this client's NTLM session",
            scaled(Duration::from_secs(5)),
        )
        .expect("the lost session is logged");
    assert!(line.contains("closing the client connection"), "{line}");
}
