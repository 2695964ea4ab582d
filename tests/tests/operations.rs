//! What an operator relies on: TLS with SNI, reload, privilege drop, limits, metrics, crash recovery.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, Keying, curl_ntlm},
    backends::recording::Backend,
    client::Connection,
    fixtures,
    gateway::{Gateway, Started},
    netns::run_in,
    topology::Topology,
    wait::{eventually, scaled},
};

fn users() -> Vec<(String, String)> {
    acceptor::users(&[("alice", "Alice-Secret1"), ("bob", "Bob-Secret2")])
}

/// Raw TCP from inside a namespace: sends `bytes` (optionally one byte at a time with a pause), then
/// reads until the peer closes or `deadline` passes. Returns what was read and whether it closed.
fn raw_exchange(
    ns: &ntlm_tag_tests::netns::NetNs,
    to: SocketAddr,
    bytes: Vec<u8>,
    byte_pause: Option<Duration>,
    deadline: Duration,
) -> (Vec<u8>, bool) {
    run_in(&ns.path(), move || async move {
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(deadline)).expect("timeout");
            match byte_pause {
                None => {
                    let _ = s.write_all(&bytes);
                }
                Some(pause) => {
                    for b in &bytes {
                        if s.write_all(&[*b]).is_err() {
                            break;
                        }
                        // A slowloris client: this pause is the behaviour under test.
                        std::thread::sleep(pause);
                    }
                }
            }
            let mut out = Vec::new();
            let closed = s.read_to_end(&mut out).is_ok();
            (out, closed)
        })
        .await
        .expect("raw client")
    })
}

#[test]
fn curl_ntlm_over_tls_with_sni_choosing_the_certificate() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let (a_cert, a_key) = fixtures::self_signed(dir.path(), "intranet.test");
    let (b_cert, b_key) = fixtures::self_signed(dir.path(), "mail.test");
    let acceptor = Acceptor::start(
        &topo.backend,
        Topology::backend_addr(),
        &users(),
        Keying::Header,
    );
    let _gw = Gateway::new()
        .backend(&acceptor)
        .args(&[
            "--tls-cert",
            &a_cert,
            "--tls-key",
            &a_key,
            "--tls-cert",
            &b_cert,
            "--tls-key",
            &b_key,
        ])
        .start(&topo.gateway);
    for (host, ca, user, password) in [
        ("intranet.test", &a_cert, "alice", "Alice-Secret1"),
        ("mail.test", &b_cert, "bob", "Bob-Secret2"),
    ] {
        let resolve = format!("{host}:8080:{}", Topology::gateway_addr().ip());
        let url = format!("https://{host}:8080/tls");
        // Trusting only the certificate made for `host`: the handshake verifies only if SNI picked it.
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4(0),
            user,
            password,
            &[url],
            &[
                "--cacert",
                ca.as_str(),
                "-v",
                "--resolve",
                &resolve,
                "--http1.1",
            ],
        );
        assert_eq!(run.users(), vec![user.to_string()], "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("subject: CN={host}"))
                || run.stderr.contains(&format!("CN={host}")),
            "SNI {host} got its own certificate: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("ALPN: server accepted http/1.1"),
            "{}",
            run.stderr
        );
    }
    let ids: Vec<String> = acceptor
        .requests()
        .iter()
        .filter_map(|r| r["conn_id"].as_str().map(str::to_string))
        .collect();
    assert!(
        ids.iter()
            .all(|id| id.starts_with(&format!("{}:", Topology::client_v4(0)))),
        "a TLS connection's identity is its TCP connection's: {ids:?}"
    );
}

#[test]
fn reload_keeps_an_authenticated_connection_and_refuses_a_broken_file() {
    let topo = Topology::new();
    let (a, b) = acceptor::two_backends(&topo.backend, &users(), Keying::Header);
    let dir = tempfile::tempdir().expect("temp dir");
    let config_for = fixtures::gateway_config;
    let config = fixtures::write(dir.path(), "gw.toml", &config_for(&[a.addr]));
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    // alice authenticates, then uploads slowly on the same connection while the gateway reloads.
    let body = fixtures::write(dir.path(), "body", &"x".repeat(48 * 1024));
    let url = format!("http://{}/", Topology::gateway_addr());
    let client_ns = topo.client.path();
    let upload = std::thread::spawn(move || {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", client_ns.display()))
            .args([
                "--",
                "curl",
                "-sS",
                "--max-time",
                "30",
                "--ntlm",
                "-u",
                "alice:Alice-Secret1",
            ])
            .arg(format!("{url}first"))
            .args([
                "--next",
                "--ntlm",
                "-u",
                "alice:Alice-Secret1",
                "--limit-rate",
                "16K",
            ])
            .args(["--data-binary", &format!("@{body}")])
            .arg(format!("{url}upload"));
        cmd.output().expect("curl")
    });
    a.wait_for_request(
        "for /first answered 200 (alice authenticated)",
        scaled(Duration::from_secs(10)),
        |r| r["path"] == "/first" && r["status"] == 200,
    );
    std::fs::write(&config, config_for(&[a.addr, b.addr])).expect("rewrite config");
    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_for_line("configuration reloaded", scaled(Duration::from_secs(5)))
            .is_some()
    );
    let out = upload.join().expect("upload thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| *l == "user=alice").count(),
        2,
        "both responses on the surviving connection are alice's: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let upload = a
        .requests()
        .into_iter()
        .find(|r| r["path"] == "/upload")
        .expect("upload reached the same backend");
    assert_eq!(upload["body_len"], 48 * 1024);

    // A broken file is refused and the running configuration keeps serving.
    std::fs::write(&config, "listen = [\"not an address\"]\n").expect("break config");
    gw.signal(libc::SIGHUP);
    let refused = gw
        .wait_for_line("reload refused", scaled(Duration::from_secs(5)))
        .expect("the refusal is logged");
    assert!(refused.contains("listen"), "names the key: {refused}");
    let run = curl_ntlm(
        &topo.client,
        Topology::client_v4(1),
        "bob",
        "Bob-Secret2",
        &[format!("http://{}/after", Topology::gateway_addr())],
        &[],
    );
    assert_eq!(run.users(), vec!["bob".to_string()], "{}", run.stderr);
    // New connections are spread over both backends now.
    for i in 2..8 {
        let run = curl_ntlm(
            &topo.client,
            Topology::client_v4(i),
            "bob",
            "Bob-Secret2",
            &[format!("http://{}/spread", Topology::gateway_addr())],
            &[],
        );
        assert_eq!(run.users(), vec!["bob".to_string()]);
    }
    assert!(
        b.requests().iter().any(|r| r["path"] == "/spread"),
        "the added backend takes new connections"
    );
}

/// The sysctl the bpf() syscall's privilege gate reads; tests that switch user hold this lock, because
/// one of them may change it (it is global, not per namespace).
static UNPRIVILEGED_BPF_SYSCTL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const UNPRIVILEGED_BPF_DISABLED: &str = "/proc/sys/kernel/unprivileged_bpf_disabled";

/// CAP_BPF, bit 39 of the capability masks in /proc/<pid>/status.
const CAP_BPF: u64 = 1 << 39;

/// This kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release.trim().split(['.', '-']);
    (
        parts.next().and_then(|p| p.parse().ok()).expect("major"),
        parts.next().and_then(|p| p.parse().ok()).expect("minor"),
    )
}

/// What a gateway that switched user should still hold on this kernel, from the kernel's history
/// rather than from asking the gateway: with unprivileged BPF disabled, kernels 5.8 to 5.18 refuse
/// every bpf() command, map lookups included, without CAP_BPF; from 5.19 only map creation and
/// program loads are gated. Anywhere else nothing is kept.
fn expected_kept_capabilities() -> u64 {
    let version = kernel_version();
    let disabled = std::fs::read_to_string(UNPRIVILEGED_BPF_DISABLED)
        .map(|v| v.trim() != "0")
        .unwrap_or(false);
    if disabled && ((5, 8)..(5, 19)).contains(&version) {
        CAP_BPF
    } else {
        0
    }
}

/// Sets `kernel.unprivileged_bpf_disabled` to 2 if it is 0 and puts 0 back when dropped (also when
/// the test fails). 2 disables unprivileged BPF like 1 but, unlike 1, can be undone without a
/// reboot; a machine already at 1 or 2 is left untouched.
struct UnprivilegedBpfDisabled {
    restore: Option<String>,
}

impl UnprivilegedBpfDisabled {
    fn ensure() -> Self {
        let now = std::fs::read_to_string(UNPRIVILEGED_BPF_DISABLED).expect("read the sysctl");
        if now.trim() != "0" {
            eprintln!("kernel.unprivileged_bpf_disabled is already {}", now.trim());
            return UnprivilegedBpfDisabled { restore: None };
        }
        std::fs::write(UNPRIVILEGED_BPF_DISABLED, "2").expect("set the sysctl to 2");
        UnprivilegedBpfDisabled {
            restore: Some(now.trim().to_string()),
        }
    }
}

impl Drop for UnprivilegedBpfDisabled {
    fn drop(&mut self) {
        if let Some(value) = &self.restore
            && let Err(e) = std::fs::write(UNPRIVILEGED_BPF_DISABLED, value)
        {
            eprintln!("could not restore kernel.unprivileged_bpf_disabled to {value}: {e}");
        }
    }
}

/// Every thread of `pid` runs as `uid`/`gid`, holds exactly `kept` (permitted, effective, bounding),
/// nothing inheritable or ambient, and has no_new_privs set.
fn assert_threads_hold_only(pid: u32, uid: &str, kept: u64) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    let mut threads = 0;
    for task in tasks {
        let path = task.expect("task").path().join("status");
        let status = std::fs::read_to_string(&path).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
                .unwrap_or_else(|| panic!("{} has no {name}: {status}", path.display()))
                .to_string()
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).expect("hex mask");
        let what = path.display();
        assert!(
            field("Uid").split_whitespace().all(|u| u == uid),
            "{what}: {status}"
        );
        assert!(
            field("Gid").split_whitespace().all(|g| g == uid),
            "{what}: {status}"
        );
        assert_eq!(mask("CapEff"), kept, "{what} CapEff: {status}");
        assert_eq!(mask("CapPrm"), kept, "{what} CapPrm: {status}");
        assert_eq!(mask("CapBnd"), kept, "{what} CapBnd: {status}");
        assert_eq!(mask("CapInh"), 0, "{what} CapInh: {status}");
        assert_eq!(mask("CapAmb"), 0, "{what} CapAmb: {status}");
        assert_eq!(field("NoNewPrivs"), "1", "{what} NoNewPrivs: {status}");
        threads += 1;
    }
    assert!(threads > 1, "the runtime's threads were checked too");
}

/// Starts a gateway that switches to `nobody` (through `wrapper`, if given), and checks what it
/// holds, that connections are identified by the kernel (not by the peer-address fallback), and
/// that a reload, which rewrites the kernel's trust list, still works after the switch.
fn switch_user_and_check_kernel_identities(wrapper: Option<&[&str]>) {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let mut gateway = Gateway::new().args(&[
        "--trusted-lb",
        "198.18.1.0/24",
        "--user",
        "nobody",
        // Several runtime threads: each must hold only what the switch left.
        "--workers",
        "2",
    ]);
    if let Some(wrapper) = wrapper {
        gateway = gateway.wrapper(wrapper);
    }
    let gw = match gateway.try_start(&topo.gateway) {
        Started::Ready(gw) => gw,
        Started::Exited { status, log } => {
            panic!("the gateway exited ({status}):\n{}", log.join("\n"))
        }
    };
    let kept = expected_kept_capabilities();
    assert_threads_hold_only(gw.pid(), "65534", kept);
    let switched = gw
        .log()
        .into_iter()
        .find(|l| l.contains("switched user"))
        .expect("the switch is logged");
    let kept_name = if kept == CAP_BPF {
        "kept=CAP_BPF"
    } else {
        "kept=none"
    };
    assert!(switched.contains(kept_name), "{switched}");
    assert!(switched.contains("why="), "the log says why: {switched}");

    let local = topo.client.run(|| async {
        let src = SocketAddr::new(Topology::client_v4(0), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        assert_eq!(conn.get("/", &[]).await.status, 200);
        conn.local
    });
    let id = backend.seen()[0].all("jespa-connection-id").remove(0);
    assert!(id.starts_with(&format!("{local}/")), "{id}");
    let metrics = gw.admin_metrics();
    let count = |source: &str| {
        let prefix = format!("ntlm_tag_connections_total{{source=\"{source}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {prefix}in {metrics}"))
    };
    assert_eq!(
        count("kernel-peer"),
        1,
        "identified by the kernel: {metrics}"
    );
    assert_eq!(count("fallback"), 0, "never by the peer address: {metrics}");
    let kernel = gw.admin_json("/kernel");
    assert_eq!(kernel["counters"]["lookup_misses"], 0, "{kernel:#}");

    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_for_line("configuration reloaded", scaled(Duration::from_secs(20)))
            .is_some(),
        "a reload (it rewrites the kernel's trust list) works after the switch: {:?}",
        gw.log()
    );
    assert!(
        !gw.log()
            .iter()
            .any(|l| l.contains("refusing") || l.contains("map lookups fail")),
        "{:?}",
        gw.log()
    );
}

#[test]
fn after_dropping_privileges_kernel_identities_still_work() {
    let _sysctl = UNPRIVILEGED_BPF_SYSCTL.lock();
    switch_user_and_check_kernel_identities(None);
}

#[test]
fn with_unprivileged_bpf_disabled_the_switch_keeps_only_what_map_lookups_need() {
    let _sysctl = UNPRIVILEGED_BPF_SYSCTL.lock();
    let _disabled = UnprivilegedBpfDisabled::ensure();
    switch_user_and_check_kernel_identities(None);
}

#[test]
fn a_user_that_does_not_exist_is_a_configuration_error() {
    let topo = Topology::new();
    match Gateway::new()
        .args(&["--user", "ntlm-tag-no-such-user"])
        .try_start(&topo.gateway)
    {
        Started::Ready(_) => panic!("started with a user that does not exist"),
        Started::Exited { status, log } => {
            assert_eq!(status.code(), Some(64), "{log:?}");
            let text = log.join("\n");
            assert!(
                text.contains("user = \"ntlm-tag-no-such-user\": no such user"),
                "names the key: {text}"
            );
        }
    }
}

/// The capabilities the packaged systemd unit gives the service (`CapabilityBoundingSet=`), in
/// setpriv's spelling: `+bpf,+net_admin,...`.
fn packaged_unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/ntlm-tag.service");
    let text = std::fs::read_to_string(&unit).expect("packaging/ntlm-tag.service");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// A cgroup made for one gateway, as systemd's `Delegate=yes` makes one for a service; removed with
/// whatever the gateway left in it (a gateway that switched user cannot remove its own cgroup).
struct DelegatedCgroup {
    path: std::path::PathBuf,
}

impl DelegatedCgroup {
    /// `<this process's cgroup>/ntlm-tag-<role>-test.<pid>`.
    fn create(role: &str) -> Self {
        let mount = ntlm_tag_tests::gateway::cgroup2_mount().expect("cgroup2 mounted");
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        let path = mount
            .join(own.trim_start_matches('/'))
            .join(format!("ntlm-tag-{role}-test.{}", std::process::id()));
        std::fs::create_dir(&path).expect("create the delegated cgroup");
        DelegatedCgroup { path }
    }
}

impl Drop for DelegatedCgroup {
    fn drop(&mut self) {
        if let Ok(children) = std::fs::read_dir(&self.path) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("could not remove {}: {e}", self.path.display());
        }
    }
}

#[test]
fn the_packaged_units_capabilities_are_enough_to_start_and_switch_user() {
    let _sysctl = UNPRIVILEGED_BPF_SYSCTL.lock();
    let allowed = packaged_unit_capabilities();
    assert!(
        !allowed.iter().any(|c| c == "sys_admin"),
        "CAP_SYS_ADMIN is not needed on 5.10+ with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN: {allowed:?}"
    );
    // As systemd starts it: root limited to the unit's bounding set, no_new_privs, LimitMEMLOCK=infinity.
    let bounding = format!(
        "-all,{}",
        allowed
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    // systemd's Delegate=yes: a cgroup of the service's own, owned by the user it starts as (root).
    let cgroup = DelegatedCgroup::create("unit");
    let cgroup_path = cgroup.path.to_string_lossy().into_owned();
    let mut wrapper = vec![
        "sh",
        "-c",
        "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"",
        &cgroup_path,
    ];
    if kernel_version() < (5, 11) {
        // Only these kernels charge BPF maps against RLIMIT_MEMLOCK (the unit's LimitMEMLOCK=infinity).
        wrapper.extend(["prlimit", "--memlock=unlimited:unlimited"]);
    }
    wrapper.extend([
        "setpriv",
        "--bounding-set",
        &bounding,
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
    ]);
    switch_user_and_check_kernel_identities(Some(&wrapper));
}

#[test]
fn slow_headers_are_cut_off_excess_connections_refused_and_big_headers_get_431() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{}\"]\nbackends = [\"{}\"]\nebpf = \"required\"\n\
             [limits]\nmax_connections = 2\nmax_header_bytes = 16384\n\
             [timeouts]\nheader_read_secs = 1\n",
            Topology::gateway_addr(),
            Topology::backend_addr()
        ),
    );
    let gw = Gateway::from_config(&config).start(&topo.gateway);

    // Slowloris: one byte a second never completes the head; cut at the 1 s header timeout.
    let started = Instant::now();
    let (_, closed) = raw_exchange(
        &topo.client,
        Topology::gateway_addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n\r\n".to_vec(),
        Some(Duration::from_millis(300)),
        Duration::from_secs(10),
    );
    assert!(closed, "the slow client was disconnected");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "cut at the header timeout, not after the whole head"
    );
    assert!(backend.seen().is_empty(), "nothing of it was forwarded");

    // 431 for a head over max_header_bytes.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (answer, _) = raw_exchange(
        &topo.client,
        Topology::gateway_addr(),
        big.into_bytes(),
        None,
        Duration::from_secs(5),
    );
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Two connections held open; a third is refused with 503 and counted.
    topo.client.run(|| async {
        let mut held = Vec::new();
        for i in 0..2 {
            let mut c = Connection::open(
                Some(SocketAddr::new(Topology::client_v4(i), 0)),
                Topology::gateway_addr(),
            )
            .await;
            assert_eq!(c.get("/held", &[]).await.status, 200);
            held.push(c);
        }
        // The third is answered 503 at once, before it sends anything, and closed.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(Topology::client_v4(2), 0))
            .expect("bind");
        let mut third = socket
            .connect(Topology::gateway_addr())
            .await
            .expect("connect");
        let mut answer = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut third, &mut answer),
        )
        .await
        .expect("closed within 5 s")
        .expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        for c in held {
            c.close().await;
        }
    });
    let metrics = gw.admin_metrics();
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(value("ntlm_tag_connections_refused_total"), 1.0);
    let ok_requests: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "ntlm_tag_requests_total" && s.labels.get("status") == Some("200"))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(ok_requests, 2.0, "{metrics}");
    assert!(value("ntlm_tag_kernel_map_capacity") > 0.0);
    // The gateway's own answers are counted as responses (backend "-") and logged like any other.
    let made_by_gateway = |status: &str| {
        scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == "ntlm_tag_requests_total"
                    && s.labels.get("backend") == Some("-")
                    && s.labels.get("status") == Some(status)
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    assert_eq!(made_by_gateway("503"), 1.0, "{metrics}");
    assert_eq!(made_by_gateway("431"), 1.0, "{metrics}");
    // The access line is written once the response has been sent: wait for it.
    assert!(
        gw.wait_for_line_where(
            |l| l.contains("access") && l.contains("status=503") && l.contains("method=-"),
            scaled(Duration::from_secs(5)),
        )
        .is_some(),
        "no access line for the 503:\n{}",
        gw.log().join("\n")
    );
}

#[test]
fn a_crashed_gateway_leaves_nothing_attached_after_the_next_start() {
    let topo = Topology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    // Both instances in a cgroup of their own: any gateway starting removes the crashed ones' leftovers
    // beside it, and the other tests of this binary start theirs in parallel in this process's cgroup.
    let cgroup = DelegatedCgroup::create("crash");
    let cgroup_path = cgroup.path.to_string_lossy().into_owned();
    let wrapper = [
        "sh",
        "-c",
        "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"",
        &cgroup_path,
    ];
    let gateway = Gateway::new().wrapper(&wrapper);
    let Started::Ready(first) = gateway.try_start(&topo.gateway) else {
        panic!("the first gateway must start");
    };
    let crashed = first.kill();
    let leftover = crashed
        .leftover_cgroup()
        .expect("a crash leaves its cgroup (and attachment) behind");
    let Started::Ready(second) = gateway.try_start(&topo.gateway) else {
        panic!("the gateway must start after a crash");
    };
    assert!(
        second
            .wait_for_line(
                "left behind by an instance that did not exit cleanly",
                scaled(Duration::from_secs(1))
            )
            .is_some()
    );
    assert!(
        !leftover.exists(),
        "the crashed instance's cgroup (with its sock_ops attachment) is gone"
    );
    let status = second.stop();
    assert!(status.success());
}

#[test]
fn idle_keep_alive_time_is_allowed_longer_than_the_header_timeout_and_then_ends() {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = fixtures::write(
        dir.path(),
        "gw.toml",
        &format!(
            "listen = [\"{}\"]\nbackends = [\"{}\"]\nebpf = \"required\"\n\
             [timeouts]\nheader_read_secs = 0.5\nidle_secs = 2\n",
            Topology::gateway_addr(),
            Topology::backend_addr()
        ),
    );
    let _gw = Gateway::from_config(&config).start(&topo.gateway);
    let (closed_after, second_status) = topo.client.run(|| async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(Topology::client_v4(0), 0))
            .expect("bind");
        let mut s = socket
            .connect(Topology::gateway_addr())
            .await
            .expect("connect");
        let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(request).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.expect("first response");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Think time longer than the header timeout: the connection must still serve.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // The gateway's idle time starts after it has this request, so time measured from before
        // sending it is a lower bound of the gateway's, whatever the machine's speed (TCG too).
        let idle_from = Instant::now();
        s.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let n = s.read(&mut buf).await.expect("second response");
        let second = String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        // Then idle: the gateway closes after the idle limit.
        let eof = tokio::time::timeout(scaled(Duration::from_secs(10)), s.read(&mut buf))
            .await
            .expect("closed within 10 s");
        assert!(matches!(eof, Ok(0) | Err(_)), "closed");
        (idle_from.elapsed(), second)
    });
    assert_eq!(second_status, "HTTP/1.1 200 OK");
    assert!(
        closed_after >= Duration::from_secs(2),
        "closed {closed_after:?} after the last request was sent, before the 2 s idle limit"
    );
    assert_eq!(backend.seen().len(), 2);
}

#[test]
fn check_validates_files_and_conns_prints_the_live_table() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = ntlm_tag_tests::gateway::binary();
    let good = fixtures::write(
        dir.path(),
        "good.toml",
        "listen = [\"198.18.1.1:8080\"]\nbackends = [\"198.18.2.2:8081\"]\n",
    );
    let out = std::process::Command::new(&bin)
        .args(["check", "--config", &good])
        .output()
        .expect("check");
    assert!(out.status.success());
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(
        effective.contains("header = \"jespa-connection-id\""),
        "{effective}"
    );
    assert!(
        effective.contains("id_template = \"{client}/{uid}\""),
        "{effective}"
    );
    let bad = fixtures::write(
        dir.path(),
        "bad.toml",
        "listen = [\"198.18.1.1:8080\"]\nbackends = [\"198.18.2.2:8081\"]\nid_template = \"{client}\"\n",
    );
    let out = std::process::Command::new(&bin)
        .args(["check", "--config", &bad])
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`id_template`"));

    let topo = Topology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new().start(&topo.gateway);
    let admin = gw.admin.arg();
    let (local, table) = topo.client.run(move || async move {
        let src = SocketAddr::new(Topology::client_v4(0), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        assert_eq!(conn.get("/", &[]).await.status, 200);
        let table = tokio::task::spawn_blocking(move || {
            // The default admin endpoint is a unix socket: no namespace needed to reach it.
            std::process::Command::new(ntlm_tag_tests::gateway::binary())
                .args(["conns", "--admin", &admin])
                .output()
                .expect("conns")
        })
        .await
        .expect("conns thread");
        (conn.local, table)
    });
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&local.to_string()), "{text}");
    assert!(
        !text.contains(&format!("{local}/")),
        "full ids only with show_full_ids: {text}"
    );
    assert!(text.contains("kernel"), "{text}");
    assert!(text.contains("1 connection(s)"), "{text}");
}

#[test]
fn id_templates_with_surrounding_spaces_are_refused_at_load() {
    // A header value loses its leading and trailing spaces on the way (RFC 9110 §5.5): the backend
    // would key sessions on an id other than the one the gateway logs and lists. Refused, from a
    // file and from the flag, with exit 64 naming the key.
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = ntlm_tag_tests::gateway::binary();
    for (i, template) in [" {client}/{uid}", "{client}/{uid} ", " {uid} "]
        .into_iter()
        .enumerate()
    {
        let file = fixtures::write(
            dir.path(),
            &format!("spaces-{i}.toml"),
            &format!(
                "listen = [\"198.18.1.1:8080\"]\nbackends = [\"198.18.2.2:8081\"]\nid_template = {template:?}\n"
            ),
        );
        let out = std::process::Command::new(&bin)
            .args(["check", "--config", &file])
            .output()
            .expect("check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{template:?}: {stderr}");
        assert!(
            stderr.contains("`id_template`") && stderr.contains("space"),
            "{template:?}: {stderr}"
        );
        let out = std::process::Command::new(&bin)
            .args([
                "run",
                "--listen",
                "198.18.1.1:8080",
                "--backend",
                "198.18.2.2:8081",
                "--ebpf",
                "off",
                "--id-template",
                template,
            ])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{template:?}: {stderr}");
        assert!(stderr.contains("`id_template`"), "{template:?}: {stderr}");
    }
    // Inner spaces are part of the id and pass.
    let inner = fixtures::write(
        dir.path(),
        "inner.toml",
        "listen = [\"198.18.1.1:8080\"]\nbackends = [\"198.18.2.2:8081\"]\nid_template = \"{client} {uid}\"\n",
    );
    let out = std::process::Command::new(&bin)
        .args(["check", "--config", &inner])
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the gateway binary with `args` and returns its exit code and stderr; a process still running
/// after a generous deadline is killed and reported as `None` (it started instead of refusing).
fn exit_of(args: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(ntlm_tag_tests::gateway::binary())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ntlm-tag");
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (code, stderr)
}

#[test]
fn check_and_run_refuse_what_run_could_not_load_with_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert_a, key_a) = fixtures::self_signed(dir.path(), "a.example");
    let (cert_b, key_b) = fixtures::self_signed(dir.path(), "b.example");
    // Port 0: should a case wrongly start, it binds nothing anyone else uses.
    let base = "listen = [{ address = \"127.0.0.1:0\", tls = [{ cert = \"CERT\", key = \"KEY\" }] }]\n\
                backends = [\"BACKEND\"]\nebpf = \"off\"\n";
    let file = |name: &str, cert: &str, key: &str, backend: &str, extra: &str| {
        fixtures::write(
            dir.path(),
            name,
            &format!(
                "{}{extra}",
                base.replace("CERT", cert)
                    .replace("KEY", key)
                    .replace("BACKEND", backend)
            ),
        )
    };
    let good = file("good.toml", &cert_a, &key_a, "127.0.0.1:9", "");
    let (code, stderr) = exit_of(&["check", "--config", &good]);
    assert_eq!(code, Some(0), "a complete configuration passes: {stderr}");
    assert!(stderr.contains("configuration OK"), "{stderr}");

    let missing = dir
        .path()
        .join("missing.pem")
        .to_string_lossy()
        .into_owned();
    let cases = [
        (
            "a missing certificate",
            file("nocert.toml", &missing, &key_a, "127.0.0.1:9", ""),
            "`listen.tls`",
        ),
        (
            "a key that is not the certificate's",
            file("mismatch.toml", &cert_a, &key_b, "127.0.0.1:9", ""),
            "`listen.tls`",
        ),
        (
            "a key file that holds a certificate",
            file("notakey.toml", &cert_a, &cert_b, "127.0.0.1:9", ""),
            "`listen.tls`",
        ),
        (
            "a user that does not exist",
            file(
                "user.toml",
                &cert_a,
                &key_a,
                "127.0.0.1:9",
                "user = \"no-such-user-7f3a\"\n",
            ),
            "`user`",
        ),
        (
            "an XDP interface that does not exist",
            file(
                "xdp.toml",
                &cert_a,
                &key_a,
                "127.0.0.1:9",
                "xdp = [\"nosuch7f3a\"]\ntrusted_lbs = [\"10.0.0.0/8\"]\n",
            ),
            "`xdp`",
        ),
        (
            "a backend name that does not resolve",
            file(
                "backend.toml",
                &cert_a,
                &key_a,
                "no-such-host.invalid:80",
                "",
            ),
            "`backends`",
        ),
    ];
    let mut failures = Vec::new();
    for (what, config, key) in &cases {
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(&[command, "--config", config]);
            if code != Some(64) || !stderr.contains(key) {
                failures.push(format!(
                    "{command} with {what}: exit {code:?}, expected 64 naming {key}: {stderr}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_reports_the_kernel_and_refuses_required_ebpf_that_cannot_load() {
    let bin = ntlm_tag_tests::gateway::binary();
    let args = [
        "check",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:9",
        "--ebpf",
        "required",
    ];
    // As root the programs pass the verifier here (this kernel runs them in every other test).
    let (code, stderr) = exit_of(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("eBPF programs: pass the verifier")
            && stderr.contains("cgroup v2: mounted"),
        "{stderr}"
    );
    // `bin` with `args` as nobody, without any capability.
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&bin)
            .args(args)
            .output()
            .expect("setpriv")
    };
    // As nobody the kernel refuses to load them: `run` would exit 69, and so does `check`, saying why.
    let out = as_nobody(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("cannot load") && stderr.contains("needs root"),
        "{stderr}"
    );
    // With `auto` the same host is a report, not an error.
    let out = as_nobody(&[&args[..5], &["--ebpf", "auto"]].concat());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn logs_to_a_pipe_or_journald_carry_no_colour_codes() {
    // No NO_COLOR here (the harness sets it): the gateway itself must see that stderr is no
    // terminal. An address of TEST-NET-2 is on no interface, so the gateway logs why it cannot
    // listen and exits.
    let mut child = std::process::Command::new(ntlm_tag_tests::gateway::binary());
    child
        .args([
            "run",
            "--listen",
            "198.51.100.1:80",
            "--backend",
            "127.0.0.1:9",
            "--ebpf",
            "off",
        ])
        .env_remove("NO_COLOR");
    let out = child.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERROR") && stderr.contains("cannot listen on 198.51.100.1:80"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escape codes in a log written to a pipe: {stderr:?}"
    );
}

/// The value of the sample `name` whose labels include `labels`, from Prometheus text.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn healthz_follows_the_backends_and_metrics_show_build_reloads_and_timings() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let backend_addr = Topology::backend_addr();
    let config_text = format!(
        "listen = [\"{}\"]\nbackends = [\"{backend_addr}\"]\nebpf = \"required\"\n\
         [health_check]\npath = \"/\"\ninterval_secs = 0.2\ntimeout_secs = 0.5\n",
        Topology::gateway_addr()
    );
    let config = fixtures::write(dir.path(), "gw.toml", &config_text);
    let gw = Gateway::from_config(&config).start(&topo.gateway);
    let backend_label = backend_addr.to_string();
    let up = [("backend", backend_label.as_str())];

    // No backend listens yet: alive, but not ready.
    eventually(
        "/healthz with the only backend down",
        || gw.admin.get("/healthz", &[]).status,
        |s| *s == 503,
    );
    assert_eq!(gw.admin.get("/livez", &[]).status, 200);
    let metrics = gw.admin_metrics();
    assert_eq!(
        sample(&metrics, "ntlm_tag_backend_up", &up),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "ntlm_tag_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{metrics}"
    );

    // The backend comes up: ready again.
    let _backend = Backend::start(&topo.backend, backend_addr);
    eventually(
        "/healthz once the backend answers",
        || gw.admin.get("/healthz", &[]).status,
        |s| *s == 200,
    );
    assert_eq!(
        sample(&gw.admin_metrics(), "ntlm_tag_backend_up", &up),
        Some(1.0)
    );

    // Two requests on one client connection: the first opens an upstream connection, the second
    // reuses it; both are timed.
    let statuses = topo.client.run(|| async {
        let src = SocketAddr::new(Topology::client_v4(0), 0);
        let mut conn = Connection::open(Some(src), Topology::gateway_addr()).await;
        let first = conn.get("/one", &[]).await.status;
        let second = conn.get("/two", &[]).await.status;
        (first, second)
    });
    assert_eq!(statuses, (200, 200));
    let metrics = gw.admin_metrics();
    let count = |name: &str, labels: &[(&str, &str)]| sample(&metrics, name, labels);
    assert_eq!(
        count("ntlm_tag_upstream_connections_total", &[("kind", "opened")]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        count("ntlm_tag_upstream_connections_total", &[("kind", "reused")]),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("ntlm_tag_request_duration_seconds_count 2")
            && metrics.contains("ntlm_tag_upstream_connect_duration_seconds_count 1")
            && metrics.contains("ntlm_tag_request_duration_seconds_bucket{le=\"+Inf\"} 2"),
        "{metrics}"
    );
    assert_eq!(
        count("ntlm_tag_config_last_reload_successful", &[]),
        Some(1.0)
    );
    let started_at = count("ntlm_tag_config_last_reload_success_timestamp_seconds", &[])
        .expect("reload timestamp");

    // A good reload, then a broken file: counted by result, and the gauges say which ran last.
    gw.signal(libc::SIGHUP);
    let after_good = eventually(
        "a counted good reload",
        || gw.admin_metrics(),
        |m| sample(m, "ntlm_tag_config_reloads_total", &[("result", "success")]) == Some(1.0),
    );
    assert!(
        sample(
            &after_good,
            "ntlm_tag_config_last_reload_success_timestamp_seconds",
            &[]
        )
        .is_some_and(|t| t >= started_at),
        "{after_good}"
    );
    std::fs::write(&config, "listen = [").expect("break the file");
    gw.signal(libc::SIGHUP);
    let after_bad = eventually(
        "a counted refused reload",
        || gw.admin_metrics(),
        |m| sample(m, "ntlm_tag_config_reloads_total", &[("result", "failure")]) == Some(1.0),
    );
    assert_eq!(
        sample(&after_bad, "ntlm_tag_config_last_reload_successful", &[]),
        Some(0.0),
        "{after_bad}"
    );
}
