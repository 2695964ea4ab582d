//! Routes: path prefixes with backend pools and health checks of their own. Real NTLM logins
//! (`curl --ntlm`) against IIS-like acceptors (NTLM keyed on their own TCP connection), one of
//! which has a broken virtual directory (`--broken /owa`: its pages and its `healthcheck.htm`
//! answer 503).

use std::{net::SocketAddr, time::Duration};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, CurlRun, Keying, curl_ntlm},
    fixtures,
    gateway::Gateway,
    topology::Topology,
    wait::{eventually, scaled},
};
use serde_json::Value;

fn users() -> Vec<(String, String)> {
    acceptor::numbered_users(8)
}

/// Two IIS-like backends, A (with `a_flags`) and B.
fn iis_backends(topo: &Topology, a_flags: &[&str]) -> (Acceptor, Acceptor) {
    let start = |port, flags| {
        Acceptor::start_with(
            &topo.backend,
            Topology::backend_at(port),
            &users(),
            Keying::Connection,
            flags,
        )
    };
    (start(8081, a_flags), start(8082, &[]))
}

/// `curl --ntlm` as user `i` from client address `i`, fetching `paths` on one connection.
fn login(topo: &Topology, i: usize, paths: &[&str], extra: &[&str]) -> CurlRun {
    let (user, password) = &users()[i];
    let urls: Vec<String> = paths.iter().map(|p| Topology::url(p)).collect();
    curl_ntlm(
        &topo.client,
        Topology::client_v4(i as u8),
        user,
        password,
        &urls,
        extra,
    )
}

/// The value of `ntlm_tag_backend_up{backend, route}`, if the gateway reports that pair.
fn backend_up(gw: &Gateway, backend: SocketAddr, route: &str) -> Option<f64> {
    let text = gw.admin_metrics();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let backend = backend.to_string();
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "ntlm_tag_backend_up"
                && s.labels.get("backend") == Some(backend.as_str())
                && s.labels.get("route") == Some(route)
        })
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Logins (authenticated answers) an acceptor gave under `prefix`.
fn logins_under(acceptor: &Acceptor, prefix: &str) -> usize {
    served_under(acceptor, prefix)
        .iter()
        .filter(|r| r["status"] == 200)
        .count()
}

/// Requests an acceptor answered under `prefix` (health pages excluded).
fn served_under(acceptor: &Acceptor, prefix: &str) -> Vec<Value> {
    acceptor
        .requests()
        .into_iter()
        .filter(|r| {
            r["path"].as_str().is_some_and(|p| {
                p.to_ascii_lowercase().starts_with(prefix) && !p.ends_with("healthcheck.htm")
            })
        })
        .collect()
}

#[test]
fn a_broken_virtual_directory_takes_only_its_own_traffic_away_from_that_backend() {
    let topo = Topology::new();
    // /owa is broken on A only; everything else works on both.
    let (a, b) = iis_backends(&topo, &["--broken", "/owa"]);
    let dir = tempfile::tempdir().expect("temp dir");
    // A health answer takes longer under an emulated kernel: the check's timeout scales with it,
    // so that only the broken directory fails its checks.
    let timeout = scaled(Duration::from_millis(500)).as_secs_f64();
    let check = |path: &str| {
        format!(
            "health_check = {{ path = \"{path}\", interval_secs = 0.2, timeout_secs = {timeout} }}"
        )
    };
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{gw}\"]\nbackends = [\"{a}\", \"{b}\"]\nebpf = \"required\"\n\
             [health_check]\npath = \"/healthz\"\ninterval_secs = 0.2\ntimeout_secs = {timeout}\n\
             [[route]]\npath_prefix = \"/owa\"\nbackends = [\"{a}\", \"{b}\"]\n{owa}\n\
             [[route]]\npath_prefix = \"/EWS/\"\nbackends = [\"{a}\", \"{b}\"]\n{ews}\n",
            gw = Topology::gateway_addr(),
            a = a.addr,
            b = b.addr,
            owa = check("/owa/healthcheck.htm"),
            ews = check("/ews/healthcheck.htm"),
        ),
    );
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    // Only /owa on A is out, and the gateway says so.
    eventually(
        "backend_up for /owa on A",
        || backend_up(&gw, a.addr, "/owa"),
        |v| *v == Some(0.0),
    );
    let line = gw
        .wait_for_line("health check failed", scaled(Duration::from_secs(10)))
        .expect("a log line for the failed check");
    assert!(
        line.contains("/owa") && line.contains(&a.addr.to_string()) && line.contains("503"),
        "{line}"
    );
    assert_eq!(backend_up(&gw, b.addr, "/owa"), Some(1.0));
    assert_eq!(backend_up(&gw, a.addr, "/EWS"), Some(1.0));
    assert_eq!(backend_up(&gw, a.addr, "default"), Some(1.0));
    let health = gw.admin.get("/healthz", &[]);
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(
        health.body.contains("route /owa: 1 of 2 backends up"),
        "{}",
        health.body
    );

    // Every /owa login lands on B, whatever the case of the path; /ews and the rest keep both.
    let logs_in = |i: usize, path: &str| {
        let run = login(&topo, i, &[path], &[]);
        assert_eq!(
            run.users(),
            [users()[i].0.clone()],
            "{path}: {}",
            run.stderr
        );
    };
    for i in 0..users().len() {
        logs_in(i, if i % 2 == 0 { "/owa/" } else { "/OWA/Inbox" });
    }
    for i in 0..users().len() {
        logs_in(i, "/ews/exchange.asmx");
    }
    for i in 0..users().len() {
        logs_in(i, "/ecp/");
    }
    assert!(
        served_under(&a, "/owa").is_empty(),
        "A's broken /owa got traffic: {:?}",
        served_under(&a, "/owa")
    );
    assert!(!served_under(&b, "/owa").is_empty());
    for (route, prefix) in [("/ews", "/ews"), ("default", "/ecp")] {
        assert!(
            !served_under(&a, prefix).is_empty() && !served_under(&b, prefix).is_empty(),
            "{route} keeps both backends: A {} requests, B {}",
            served_under(&a, prefix).len(),
            served_under(&b, prefix).len()
        );
    }
}

#[test]
fn a_bound_connection_keeps_its_backend_across_routes_and_is_refused_where_that_backend_is_not() {
    let topo = Topology::new();
    let (a, b) = iis_backends(&topo, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    // /owa only on A, /ecp on both, /ews only on B.
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{gw}\"]\nbackends = [\"{a}\"]\nebpf = \"required\"\n\
             [[route]]\npath_prefix = \"/owa\"\nbackends = [\"{a}\"]\n\
             [[route]]\npath_prefix = \"/ecp\"\nbackends = [\"{b}\", \"{a}\"]\n\
             [[route]]\npath_prefix = \"/ews\"\nbackends = [\"{b}\"]\n",
            gw = Topology::gateway_addr(),
            a = a.addr,
            b = b.addr,
        ),
    );
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    // One client connection: NTLM login on /owa (bound to an upstream connection to A), then
    // /ecp (A serves it: the same upstream connection, still authenticated), then /ews (A does not
    // serve it: 421 and the connection is closed, nothing sent to B).
    let run = login(
        &topo,
        1,
        &["/owa/", "/ecp/", "/ews/exchange.asmx"],
        &["-w", "status=%{http_code}\n"],
    );
    let statuses: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("status="))
        .collect();
    assert_eq!(
        statuses,
        ["200", "200", "421"],
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.users(), ["user01", "user01"], "{}", run.stdout);
    let on_a: Vec<Value> = a
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/ecp/")
        .collect();
    assert_eq!(on_a.len(), 1, "/ecp went to A: {on_a:?}");
    assert_eq!(on_a[0]["user"], "user01", "without a new login: {on_a:?}");
    let owa_conns: Vec<u64> = a
        .requests()
        .iter()
        .filter(|r| r["path"] == "/owa/")
        .filter_map(|r| r["conn"].as_u64())
        .collect();
    assert!(
        owa_conns.contains(&on_a[0]["conn"].as_u64().unwrap_or(u64::MAX)),
        "/ecp on the upstream connection of the /owa login: {owa_conns:?} vs {on_a:?}"
    );
    assert!(
        b.requests().is_empty(),
        "nothing reached B (the session's request would arrive there anonymous): {:?}",
        b.requests()
    );
    let line = gw
        .wait_for_line("not in the route's pool", scaled(Duration::from_secs(5)))
        .expect("a log line for the refusal");
    assert!(
        line.contains("route /ews") && line.contains(&a.addr.to_string()) && line.contains("421"),
        "{line}"
    );

    let metrics = gw.admin_metrics();
    assert!(
        metrics.contains("ntlm_tag_errors_total{origin=\"internal\"} 1"),
        "the refusal is counted as the gateway's own: {metrics}"
    );

    // A new connection is routed afresh: /ews reaches B.
    let run = login(&topo, 1, &["/ews/exchange.asmx"], &[]);
    assert_eq!(run.users(), ["user01"], "{}", run.stderr);
    assert!(!served_under(&b, "/ews").is_empty());
}

#[test]
fn a_reload_applies_route_changes_to_new_connections() {
    let topo = Topology::new();
    let (a, b) = iis_backends(&topo, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let base = format!(
        "listen = [\"{}\"]\nbackends = [\"{}\"]\nebpf = \"required\"\n",
        Topology::gateway_addr(),
        a.addr
    );
    let config = fixtures::write(dir.path(), "gw.toml", &base);
    let gw = Gateway::from_config(&config).start(&topo.gateway);
    let logs_in = || {
        let run = login(&topo, 2, &["/owa/"], &[]);
        assert_eq!(run.users(), ["user02"], "{}", run.stderr);
    };
    logs_in();
    assert_eq!(logins_under(&a, "/owa"), 1);

    fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "{base}[[route]]\npath_prefix = \"/owa\"\nbackends = [\"{}\"]\n",
            b.addr
        ),
    );
    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_for_line("configuration reloaded", scaled(Duration::from_secs(10)))
            .is_some_and(|l| l.contains("/owa")),
        "the reload is applied: {:?}",
        gw.log()
    );
    eventually(
        "backend_up for the new route",
        || backend_up(&gw, b.addr, "/owa"),
        |v| *v == Some(1.0),
    );
    logs_in();
    assert_eq!(logins_under(&b, "/owa"), 1, "the new route's pool");
    assert_eq!(logins_under(&a, "/owa"), 1, "nothing more on the old one");
}
