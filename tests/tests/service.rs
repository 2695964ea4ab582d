//! Running as a systemd service: what the gateway tells the service manager (`Type=notify`:
//! READY, RELOADING, STOPPING, STATUS) on a notification socket the test owns, and `ntlm-tag
//! reload`, the unit's `ExecReload`, which waits for the reload and fails with the gateway's reason;
//! colour in logs only for a terminal that did not ask for none.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, Keying, curl_ntlm},
    fixtures,
    gateway::{self, Admin, Gateway, Started},
    netns::NetNs,
    topology::Topology,
    wait::scaled,
};

fn users() -> Vec<(String, String)> {
    acceptor::users(&[("alice", "Alice-Secret1")])
}

/// The notification socket systemd would pass in `NOTIFY_SOCKET`, owned by the test.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
        NotifySocket { socket, path }
    }

    /// The next message, or `None` after `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages up to and including the first with the line `line` (periodic `STATUS=` refreshes
    /// may come in between); panics naming what arrived if none does in time.
    fn until(&self, line: &str) -> Vec<String> {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        let mut seen = Vec::new();
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {line} within the deadline; received {seen:?}"));
            let Some(message) = self.next(left) else {
                panic!("no {line} within the deadline; received {seen:?}");
            };
            let done = message.lines().any(|l| l == line);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

/// `STATUS=` of a message.
fn status_of(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// `ntlm-tag reload --admin <admin>`, as the unit's `ExecReload` runs it.
fn reload_command(admin: &Admin) -> Output {
    std::process::Command::new(gateway::binary())
        .args(["reload", "--admin", &admin.arg()])
        .output()
        .expect("run ntlm-tag reload")
}

fn alice_through_the_gateway(client: &NetNs, i: u8, path: &str) -> Vec<String> {
    let run = curl_ntlm(
        client,
        Topology::client_v4(i),
        "alice",
        "Alice-Secret1",
        &[Topology::url(&format!("/{path}"))],
        &[],
    );
    assert!(run.success, "curl through the gateway: {}", run.stderr);
    run.users()
}

#[test]
fn systemd_hears_ready_once_serving_reloading_around_each_reload_and_stopping() {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Header);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, fixtures::gateway_config(&[a.addr])).expect("write config");
    let notify = NotifySocket::bind(dir.path());
    let admin = Admin::Unix(dir.path().join("admin.sock"));

    // The moment READY=1 arrives, a client is served and the kernel programs are attached.
    let gateway = Gateway::from_config(&config)
        .args(&["--admin", &admin.arg()])
        .env("NOTIFY_SOCKET", &notify.path.to_string_lossy());
    let (gw, (ready, served, ebpf)) = std::thread::scope(|scope| {
        let on_ready = scope.spawn(|| {
            let ready = notify.until("READY=1");
            let served = alice_through_the_gateway(&topo.client, 1, "at-ready");
            let ebpf = admin.json("/kernel")["ebpf"].clone();
            (ready, served, ebpf)
        });
        let gw = match gateway.try_start(&topo.gateway) {
            Started::Ready(gw) => gw,
            Started::Exited { status, log } => panic!("exited ({status}):\n{}", log.join("\n")),
        };
        (gw, on_ready.join().expect("the READY thread"))
    });
    assert_eq!(ready.len(), 1, "READY=1 is the first message: {ready:?}");
    assert_eq!(
        status_of(&ready[0]),
        Some("serving 0 connection(s), 1/1 backends up"),
        "{ready:?}"
    );
    assert_eq!(served, ["alice"], "a client is served once READY=1 is sent");
    assert_eq!(
        ebpf, "attached",
        "the kernel programs are attached at READY=1"
    );

    // SIGHUP: RELOADING=1 (with the time the notify-reload protocol wants), then READY=1.
    std::fs::write(&config, fixtures::gateway_config(&[a.addr, b.addr])).expect("rewrite config");
    gw.signal(libc::SIGHUP);
    let reloading = notify.until("RELOADING=1");
    assert!(
        reloading
            .last()
            .is_some_and(|m| m.lines().any(|l| l.starts_with("MONOTONIC_USEC="))),
        "{reloading:?}"
    );
    let reloaded = notify.until("READY=1");
    assert_eq!(
        reloaded.last().and_then(|m| status_of(m)),
        Some("serving 0 connection(s), 2/2 backends up"),
        "the status line follows the reload: {reloaded:?}"
    );

    // `ntlm-tag reload` of a broken file: the same pair, and the refusal stays in the status line.
    std::fs::write(&config, "listen = [\"not an address\"]\n").expect("break config");
    let out = reload_command(&gw.admin);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    notify.until("RELOADING=1");
    let refused = notify.until("READY=1");
    let status = refused.last().and_then(|m| status_of(m)).unwrap_or("");
    assert!(
        status.starts_with("serving 0 connection(s), 2/2 backends up; last reload refused: ")
            && status.contains("listen"),
        "{refused:?}"
    );

    // SIGTERM: STOPPING=1 before the drain.
    assert!(
        gw.wait_for_line("reload refused", scaled(Duration::from_secs(5)))
            .is_some()
    );
    let stopped = gw.stop();
    assert!(stopped.success(), "{stopped}");
    let stopping = notify.until("STOPPING=1");
    assert_eq!(
        stopping.last().and_then(|m| status_of(m)),
        Some("stopping: draining 0 connection(s)"),
        "{stopping:?}"
    );
}

#[test]
fn ntlm_tag_reload_exits_0_when_applied_and_64_with_the_reason_when_refused() {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Header);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, fixtures::gateway_config(&[a.addr])).expect("write config");
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    // A good file: exit 0 once applied, saying what; new connections go to the new backend.
    std::fs::write(&config, fixtures::gateway_config(&[b.addr])).expect("rewrite config");
    let out = reload_command(&gw.admin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("reloaded") && stdout.contains(&b.addr.to_string()),
        "{stdout}"
    );
    assert_eq!(
        alice_through_the_gateway(&topo.client, 1, "applied"),
        ["alice"]
    );
    assert!(
        b.requests().iter().any(|r| r["path"] == "/applied"),
        "the reload was applied before the command returned"
    );

    // Reloads asked at once are run one after another, each answered with its own outcome.
    let concurrent: Vec<_> = (0..3)
        .map(|_| {
            let admin = gw.admin.clone();
            std::thread::spawn(move || reload_command(&admin))
        })
        .collect();
    for handle in concurrent {
        let out = handle.join().expect("reload thread");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }

    // A broken file: exit 64 with the gateway's reason naming the key; the old one keeps serving.
    std::fs::write(&config, "listen = [\"not an address\"]\n").expect("break config");
    let out = reload_command(&gw.admin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        stderr.contains("reload refused") && stderr.contains("listen"),
        "{stderr}"
    );
    assert_eq!(
        alice_through_the_gateway(&topo.client, 2, "still"),
        ["alice"]
    );
    assert!(b.requests().iter().any(|r| r["path"] == "/still"));

    // No gateway on the endpoint: exit 1, saying so.
    let gone = Admin::Unix(dir.path().join("nothing-here.sock"));
    let out = reload_command(&gone);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open the admin socket"),
        "{out:?}"
    );
}

#[test]
fn no_color_turns_colour_off_on_a_terminal_too() {
    // `script` gives the gateway a terminal for stderr; a TEST-NET-2 address is on no interface, so
    // it logs why it cannot listen and exits.
    let gateway = gateway::binary();
    let run = |no_color: Option<&str>| {
        let mut cmd = std::process::Command::new("script");
        cmd.args(["-qec"])
            .arg(format!(
                "{} run --listen 198.51.100.1:80 --backend 127.0.0.1:9 --ebpf off",
                gateway.display()
            ))
            .arg("/dev/null")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().expect("run script");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = run(None);
    assert!(
        coloured.contains("cannot listen") && coloured.contains('\u{1b}'),
        "a terminal gets colour: {coloured:?}"
    );
    let plain = run(Some("1"));
    assert!(
        plain.contains("cannot listen") && !plain.contains('\u{1b}'),
        "NO_COLOR=1 on a terminal: {plain:?}"
    );
}

#[test]
fn reload_on_a_tcp_admin_address_needs_the_token() {
    use std::os::unix::fs::PermissionsExt;
    let topo = Topology::new();
    let a = Acceptor::start(
        &topo.backend,
        Topology::backend_at(8081),
        &users(),
        Keying::Header,
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, fixtures::gateway_config(&[a.addr])).expect("write config");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "7c1f0a9e5d3b2c4a6e8f0d1b3a5c7e9f\n").expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let token = token_file.to_str().expect("utf-8");
    let gw = Gateway::from_config(&config)
        .args(&["--admin", "127.0.0.1:9181", "--admin-token-file", token])
        .start(&topo.gateway);
    let reload = |extra: &[&str]| {
        topo.gateway
            .command(gateway::binary().to_str().expect("utf-8"))
            .args(["reload", "--admin", "127.0.0.1:9181"])
            .args(extra)
            .output()
            .expect("run ntlm-tag reload")
    };
    let refused = reload(&[]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "without the token: {refused:?}"
    );
    let applied = reload(&["--token-file", token]);
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    // Only the second request reloaded: counted in the whole log, read to its end, so that a line
    // still on its way counts too.
    let (_, log) = gw.stop_with_log();
    let requested: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("reload requested"))
        .collect();
    assert_eq!(
        requested.len(),
        1,
        "nothing was reloaded without the token: {requested:#?}"
    );
}
