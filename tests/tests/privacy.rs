//! What keeps one user's connection id from another: the admin endpoint is private (a 0600 unix
//! socket, or TCP with a bearer token), logs and the table show keyed hashes unless the operator
//! opts in, and clients cannot choose forwarding headers (nor the scheme the backend is told).

use std::{
    net::SocketAddr, os::unix::fs::PermissionsExt, path::Path, process::Output, time::Duration,
};

use ntlm_tag_tests::{
    backends::recording::Backend,
    client::Connection,
    fixtures,
    gateway::{Admin, Gateway, GatewayBuilder},
    topology::Topology,
    wait::scaled,
};

/// `setpriv` arguments that run a command as `nobody`, with no groups and no capabilities.
const AS_NOBODY: [&str; 8] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--",
    "curl",
];

/// A directory like /run/ntlm-tag (0755: any user may look in; the socket's own mode decides).
fn run_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// `curl` in the namespace at `ns` as nobody (or as root), printing the status code after the body.
fn curl(ns: &Path, as_nobody: bool, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.display())).arg("--");
    if as_nobody {
        cmd.args(AS_NOBODY);
    } else {
        cmd.arg("curl");
    }
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl")
}

/// The status code `curl` printed last (000 when it could not connect).
fn status(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn body(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The uid part of an id (what makes it a credential).
fn uid_of(id: &str) -> &str {
    id.rsplit('/').next().expect("uid")
}

/// Runs `check` (given the client's address) while a client connection that made one request is
/// open, so that the table has its row.
fn while_connected<T: Send + 'static>(
    topo: &Topology,
    check: impl FnOnce(SocketAddr) -> T + Send + 'static,
) -> T {
    topo.client.run(move || async move {
        let src = SocketAddr::new(Topology::client_v4(0), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        assert_eq!(conn.get("/private", &[]).await.status, 200);
        let local = conn.local;
        let result = tokio::task::spawn_blocking(move || check(local))
            .await
            .expect("check");
        conn.close().await;
        result
    })
}

/// The standard gateway, with the kernel programs if this host can load them: what is checked
/// here does not depend on them.
fn gateway() -> GatewayBuilder {
    Gateway::new().ebpf("auto")
}

#[test]
fn local_users_cannot_read_ids_from_the_admin_socket_but_root_can_and_logs_show_hashes() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = run_dir();
    let socket = dir.path().join("admin.sock");
    let endpoint = format!("unix:{}", socket.display());
    let gw = gateway().args(&["--admin", &endpoint]).start(&topo.gateway);

    // The socket is 0600, in a directory anyone may enter.
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    let gw_ns = topo.gateway.path();
    let (local, denied, conns, root) = {
        let (sock, endpoint) = (socket.clone(), endpoint.clone());
        while_connected(&topo, move |local| {
            let sock = sock.to_str().expect("utf-8");
            let url = "http://admin/connections";
            // nobody: the connect itself is refused (curl prints code 000).
            let denied = curl(&gw_ns, true, &["--unix-socket", sock, url]);
            // `ntlm-tag conns` as nobody says why.
            let conns = std::process::Command::new("setpriv")
                .args(&AS_NOBODY[1..7])
                .arg(ntlm_tag_tests::gateway::binary())
                .args(["conns", "--admin", &endpoint])
                .output()
                .expect("conns");
            let root = curl(&gw_ns, false, &["--unix-socket", sock, url]);
            (local, denied, conns, root)
        })
    };
    let seen = backend.seen();
    let ids = seen.last().expect("a request").all("jespa-connection-id");
    assert!(ids[0].starts_with(&format!("{local}/")), "{ids:?}");
    let uid = uid_of(&ids[0]).to_string();

    assert_eq!(
        status(&denied),
        "000",
        "nobody read the table: {}",
        body(&denied)
    );
    assert!(!body(&denied).contains(&uid));
    assert!(!conns.status.success());
    let err = String::from_utf8_lossy(&conns.stderr);
    assert!(err.contains("cannot open the admin socket"), "{err}");

    // root: the table, with the connection named by a hash, not by its id.
    assert_eq!(status(&root), "200", "{}", body(&root));
    let text = body(&root);
    let table: serde_json::Value =
        serde_json::from_str(text.rsplit_once('\n').expect("code").0).expect("json");
    let row = table
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["client"] == local.to_string())
        .unwrap_or_else(|| panic!("no row for {local}: {text}"))
        .clone();
    assert!(!text.contains(&uid), "the table shows the full id: {text}");
    assert!(row.get("id").is_none(), "{row:#}");
    let hash = row["id_hash"].as_str().expect("hash").to_string();

    // The access line names the connection by the same hash, and no log line holds the uid.
    let access = gw
        .wait_for_line("/private", scaled(Duration::from_secs(5)))
        .expect("an access line");
    assert!(access.contains(&format!("conn={hash}")), "{access}");
    assert!(!access.contains("conn_id"), "{access}");

    // Stopped, the gateway removes its socket. Its whole log, read to the end (a line about this
    // connection may still be on its way before), never holds the uid.
    let (status, log) = gw.stop_with_log();
    assert!(status.success(), "{status}");
    let log = log.join("\n");
    assert!(!log.contains(&uid), "a log line holds the full id:\n{log}");
    assert!(!socket.exists(), "the admin socket outlived the gateway");
}

#[test]
fn on_tcp_the_table_needs_the_bearer_token_and_without_a_token_file_it_is_closed() {
    let topo = Topology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let token = "3f6c0e9d2b8a41d7a5e2c9b0f1d34e6a7b8c9d0e1f2a3b4c";
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let token_path = token_file.to_str().expect("utf-8");
    let gw = gateway()
        .args(&[
            "--admin",
            "127.0.0.1:9180",
            "--admin-token-file",
            token_path,
        ])
        .start(&topo.gateway);
    let gw_ns = topo.gateway.path();
    let base = "http://127.0.0.1:9180";
    for path in ["/connections", "/kernel"] {
        let out = curl(&gw_ns, true, &[&format!("{base}{path}")]);
        assert_eq!(
            status(&out),
            "401",
            "nobody without a token on {path}: {}",
            body(&out)
        );
        assert!(body(&out).contains("admin_token_file"), "{}", body(&out));
        let wrong = curl(
            &gw_ns,
            true,
            &[
                "-H",
                "Authorization: Bearer 3f6c0e9d2b8a41d7a5e2c9b0f1d34e6a7b8c9d0e1f2a3b4d",
                &format!("{base}{path}"),
            ],
        );
        assert_eq!(status(&wrong), "401", "a wrong token on {path}");
    }
    // Nor can nobody read the token file.
    let cat = std::process::Command::new("setpriv")
        .args(&AS_NOBODY[1..7])
        .args(["cat", token_path])
        .output()
        .expect("cat");
    assert!(!cat.status.success(), "nobody read the token file");
    // /healthz and /metrics stay open (no ids in them).
    for path in ["/healthz", "/metrics"] {
        let out = curl(&gw_ns, true, &[&format!("{base}{path}")]);
        assert_eq!(status(&out), "200", "{path}: {}", body(&out));
    }
    // With the token: the table, and `ntlm-tag conns` sends it too.
    let auth = format!("Authorization: Bearer {token}");
    let (ok, conns) = {
        let (gw_ns, token_path) = (gw_ns.clone(), token_path.to_string());
        while_connected(&topo, move |_| {
            let ok = curl(
                &gw_ns,
                false,
                &["-H", &auth, &format!("{base}/connections")],
            );
            let conns = std::process::Command::new("nsenter")
                .arg(format!("--net={}", gw_ns.display()))
                .arg("--")
                .arg(ntlm_tag_tests::gateway::binary())
                .args([
                    "conns",
                    "--admin",
                    "127.0.0.1:9180",
                    "--token-file",
                    &token_path,
                ])
                .output()
                .expect("conns");
            (ok, conns)
        })
    };
    assert_eq!(status(&ok), "200", "{}", body(&ok));
    assert!(body(&ok).contains("\"id_hash\""), "{}", body(&ok));
    assert!(
        conns.status.success(),
        "{}",
        String::from_utf8_lossy(&conns.stderr)
    );
    let table = String::from_utf8_lossy(&conns.stdout);
    assert!(table.contains("1 connection(s)"), "{table}");
    drop(gw);

    // TCP without a token file: the private pages are closed to everyone, saying how to open them.
    let gw = gateway()
        .args(&["--admin", "127.0.0.1:9180"])
        .start(&topo.gateway);
    let closed = gw.admin.get("/connections", &[]);
    assert_eq!(closed.status, 403, "{}", closed.body);
    assert!(closed.body.contains("admin_token_file"), "{}", closed.body);
    assert_eq!(gw.admin.get("/healthz", &[]).status, 200);
}

#[test]
fn full_ids_are_an_opt_in_that_warns_and_a_stale_socket_is_replaced() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = run_dir();
    let socket = dir.path().join("admin.sock");
    // An earlier run that crashed left its socket file behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    assert!(socket.exists());
    let endpoint = format!("unix:{}", socket.display());
    let gw = gateway()
        .args(&["--admin", &endpoint, "--show-full-ids"])
        .start(&topo.gateway);
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains("show_full_ids") && l.contains("WARN")),
        "{:#?}",
        gw.log()
    );
    let (local, row) = {
        let admin = gw.admin.clone();
        while_connected(&topo, move |local| {
            (local, admin.json("/connections")[0].clone())
        })
    };
    let seen = backend.seen();
    let id = seen.last().expect("a request").all("jespa-connection-id")[0].clone();
    assert!(id.starts_with(&format!("{local}/")));
    // The id is `<client>/<13-character nonce><26-character AES block>`.
    assert_eq!(uid_of(&id).len(), 39, "{id}");
    assert_eq!(row["id"], id.as_str(), "{row:#}");
    let Admin::Unix(path) = &gw.admin else {
        panic!("a unix admin endpoint");
    };
    assert_eq!(path, &socket);
    let access = gw
        .wait_for_line("access", scaled(Duration::from_secs(5)))
        .expect("an access line");
    assert!(
        access.contains(&id),
        "the access line shows the full id: {access}"
    );
    drop(gw);
    assert!(!socket.exists());
}

/// A self-signed certificate for `name`; returns (cert path, key path).

#[test]
fn client_forwarding_headers_are_stripped_and_tls_listeners_say_https() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = fixtures::self_signed(dir.path(), "intranet.test");
    let plain = Topology::gateway_addr();
    let tls = SocketAddr::new(plain.ip(), 8443);
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{plain}\", {{ address = \"{tls}\", tls = [{{ cert = \"{}\", key = \"{}\" }}] }}]\n\
             backends = [\"{}\"]\nebpf = \"auto\"\n",
            cert,
            key,
            Topology::backend_addr()
        ),
    );
    let _gw = Gateway::from_config(&config).start(&topo.gateway);

    let forged = [
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: evil.example",
        "X-Forwarded-Port: 1",
        "True-Client-IP: 203.0.113.9",
        "X-Cluster-Client-IP: 203.0.113.9",
        "CF-Connecting-IP: 203.0.113.9",
        "Client-IP: 203.0.113.9",
        "X-Original-Forwarded-For: 203.0.113.9",
        "X_Forwarded_Proto: https",
        "true.client.ip: 203.0.113.9",
        "Front-End-Https: on",
    ];
    let src = Topology::client_v4(0).to_string();
    for (url, scheme) in [
        (format!("http://{plain}/plain"), "http"),
        (format!("https://{tls}/tls"), "https"),
    ] {
        let mut args = vec!["-k".to_string(), "--interface".to_string(), src.clone()];
        for h in forged {
            args.extend(["-H".to_string(), h.to_string()]);
        }
        args.push(url.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = curl(&topo.client.path(), false, &args);
        assert_eq!(
            status(&out),
            "200",
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = backend.seen();
        let r = seen.last().expect("a request");
        for (name, value) in r.headers.iter() {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !value.contains("203.0.113.9") && !value.contains("evil.example") && value != "on",
                "{url}: the client's {name}: {value} reached the backend"
            );
        }
        for name in [
            "x-forwarded-host",
            "x-forwarded-port",
            "true-client-ip",
            "x_forwarded_proto",
            "front-end-https",
        ] {
            assert!(
                r.all(name).is_empty(),
                "{url}: {name} passed: {:?}",
                r.headers
            );
        }
        assert_eq!(
            r.all("x-forwarded-proto"),
            vec![scheme.to_string()],
            "{url}"
        );
        let forwarded = r.all("forwarded");
        assert_eq!(forwarded.len(), 1, "{url}: {forwarded:?}");
        assert!(
            forwarded[0].ends_with(&format!(";proto={scheme}")),
            "{url}: {forwarded:?}"
        );
    }
}

#[test]
fn admin_connections_are_capped_and_an_idle_one_is_closed() {
    use std::io::Read;
    let topo = Topology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = gateway().start(&topo.gateway);
    let Admin::Unix(socket) = gw.admin.clone() else {
        panic!("the harness's default admin endpoint is a unix socket");
    };
    // 16 connections that never send a request hold every slot ...
    let idle: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).expect("connect"))
        .collect();
    // ... so the next one is closed at once, unanswered.
    let mut extra = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    extra
        .set_read_timeout(Some(scaled(std::time::Duration::from_secs(10))))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert_eq!(extra.read(&mut buf).expect("closed, not timed out"), 0);
    assert!(
        gw.wait_for_line("too many admin connections", scaled(Duration::from_secs(5)))
            .is_some(),
        "the refusal is logged"
    );
    // An idle connection is closed after the 5 s head timeout (well before the 30 s lifetime).
    let started = std::time::Instant::now();
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(scaled(std::time::Duration::from_secs(25))))
        .expect("timeout");
    let n = first.read(&mut buf).expect("closed, not timed out");
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        &buf[..n]
    );
    assert!(
        started.elapsed() < scaled(Duration::from_secs(20)),
        "closed after {:?}",
        started.elapsed()
    );
    drop(idle);
    // With the slots free again, the endpoint answers.
    assert_eq!(gw.admin.get("/healthz", &[]).status, 200);
}
