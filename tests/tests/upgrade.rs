//! Zero-downtime upgrade: `ntlm-tag upgrade` takes the listeners over from the running gateway,
//! which keeps serving its own connections until they close or its drain deadline passes.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ntlm_tag_tests::{
    acceptor::{self, Acceptor, Keying},
    gateway::{Gateway, GatewayBuilder, Started, cgroup2_mount, kernel_counter, walk_named},
    keepalive_client::KeepAliveLogin,
    metrics::sample,
    netns::NetNs,
    programs::IpipEncap,
    topology::{IPIP_VIP, IpipTopology, SNAT_SOURCE, Topology},
    wait::{eventually_within, scaled},
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: (&str, &str) = ("user00", "Secret-0!");

fn users() -> Vec<(String, String)> {
    acceptor::users(&[USER])
}

/// The standard gateway with an upgrade socket in `dir`.
fn gateway(dir: &Path) -> GatewayBuilder {
    Gateway::new().args(&[
        "--upgrade-socket",
        &dir.join("upgrade.sock").display().to_string(),
    ])
}

/// The uid prefix every id of this gateway carries, from its ready line.
fn uid_nonce(gateway: &mut Gateway) -> String {
    let line = gateway
        .wait_for_line("ntlm-tag ready", Duration::from_secs(1))
        .expect("ready line");
    let (_, rest) = line
        .split_once("uid_nonce=")
        .expect("uid_nonce in the ready line");
    rest.trim_start_matches('"')
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect()
}

/// The uid part of a connection id (`ip:port/uid`).
fn uid_of(id: &str) -> &str {
    id.rsplit_once('/').map_or("", |(_, uid)| uid)
}

/// Polls `gateway`'s metric `name` until it equals `value` (it is reported once a second).
fn wait_for_metric(gateway: &Gateway, name: &str, value: u64) {
    eventually_within(
        &format!("{name} to reach {value}"),
        scaled(Duration::from_secs(20)),
        || gateway.metric(name, ""),
        |v| *v == Some(value),
    );
}

/// The ids the backend saw on requests for `path`, in order.
fn ids_for(acceptor: &Acceptor, path: &str) -> Vec<String> {
    acceptor
        .requests()
        .iter()
        .filter(|r| r["path"] == path)
        .filter_map(|r| r["conn_id"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the backend saw `n` requests for `path` whose ids start with `nonce`.
fn wait_for_requests(acceptor: &Acceptor, path: &str, nonce: &str, n: usize) {
    acceptor.wait_for_request(
        &format!("{n} requests for {path} from the gateway with uid nonce {nonce}"),
        scaled(Duration::from_secs(30)),
        |_| {
            ids_for(acceptor, path)
                .iter()
                .filter(|id| uid_of(id).starts_with(nonce))
                .count()
                >= n
        },
    );
}

/// Clients connecting at the same time in the loop.
const CONCURRENT_CLIENTS: usize = 4;

/// Connects again and again (a new connection for each request) until stopped; every attempt must
/// get an HTTP response. Returns (attempts, failures).
struct ClientLoop {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    handle: std::thread::JoinHandle<usize>,
}

impl ClientLoop {
    /// Connects from `client` to `dst`.
    fn start(client: &NetNs, dst: SocketAddr, path: &'static str) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let handle = {
            let stop = Arc::clone(&stop);
            let failures = Arc::clone(&failures);
            client.spawn(move || async move {
                // Several connections at a time, so that some are in the kernel's queue while the
                // listeners change hands.
                let tasks: Vec<_> = (0..CONCURRENT_CLIENTS)
                    .map(|task| {
                        let stop = Arc::clone(&stop);
                        let failures = Arc::clone(&failures);
                        tokio::spawn(async move {
                            let mut attempts = 0;
                            while !stop.load(Ordering::SeqCst) {
                                attempts += 1;
                                if let Err(e) = one_request(dst, path).await {
                                    failures
                                        .lock()
                                        .expect("failures")
                                        .push(format!("client {task}, attempt {attempts}: {e}"));
                                }
                                // Paced, so that the loop leaves the shared CPUs to the gateways.
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            attempts
                        })
                    })
                    .collect();
                let mut attempts = 0;
                for task in tasks {
                    attempts += task.await.expect("client task");
                }
                attempts
            })
        };
        ClientLoop {
            stop,
            failures,
            handle,
        }
    }

    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let attempts = self.handle.join().expect("client loop");
        let failures = self.failures.lock().expect("failures").clone();
        (attempts, failures)
    }
}

/// One connection, one request, the whole response read: anything but an HTTP response is a failure.
async fn one_request(dst: SocketAddr, path: &str) -> Result<(), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(dst)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if response.starts_with(b"HTTP/1.1 ") {
            Ok(())
        } else {
            Err(format!(
                "no HTTP response: {:?}",
                String::from_utf8_lossy(&response)
            ))
        }
    };
    tokio::time::timeout(scaled(Duration::from_secs(10)), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn cgroup_of(pid: u32) -> Vec<std::path::PathBuf> {
    cgroup2_mount()
        .map(|mount| walk_named(&mount, &format!("ntlm-tag.{pid}")))
        .unwrap_or_default()
}

fn log_in(topo: &Topology) -> (KeepAliveLogin, String) {
    log_in_from(
        &topo.client,
        Topology::client_v4(1),
        Topology::gateway_addr(),
    )
}

/// A keep-alive NTLM login from `source` in `client` to `dst`; returns it and its connection id.
fn log_in_from(
    client: &NetNs,
    source: std::net::IpAddr,
    dst: SocketAddr,
) -> (KeepAliveLogin, String) {
    let (client, first) = KeepAliveLogin::start(client, source, dst, "/held", USER);
    assert_eq!(first["status"], 200, "the login passes: {first}");
    let body = first["body"].as_str().unwrap_or_default();
    assert!(body.contains("user=user00"), "{body}");
    let id = body
        .lines()
        .find_map(|l| l.strip_prefix("conn_id="))
        .expect("the backend echoes the id")
        .to_string();
    (client, id)
}

/// The standard topology with an IIS-like backend, and the arguments of gateways whose upgrade
/// socket and admin socket (the same for both, so that it is handed over too) live in a directory
/// of their own, with `config` as their file.
struct Scene {
    topo: Topology,
    acceptor: Acceptor,
    dir: tempfile::TempDir,
    gateway: GatewayBuilder,
}

impl Scene {
    fn new(config: &str) -> Scene {
        let topo = Topology::new();
        let acceptor = Acceptor::start(
            &topo.backend,
            Topology::backend_addr(),
            &users(),
            Keying::Connection,
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("gw.toml");
        std::fs::write(&file, config).expect("config");
        let admin = format!("unix:{}", dir.path().join("admin.sock").display());
        let gateway = gateway(dir.path()).args(&["--admin", &admin]).config(&file);
        Scene {
            topo,
            acceptor,
            dir,
            gateway,
        }
    }
}

#[test]
fn an_upgrade_keeps_logged_in_connections_on_the_old_process_and_refuses_no_new_one() {
    let Scene {
        topo,
        acceptor,
        dir,
        gateway,
    } = Scene::new("");
    let mut old = gateway.start(&topo.gateway);
    let old_nonce = uid_nonce(&mut old);
    let old_pid = old.pid();

    // A user logs in on a keep-alive connection (the IIS-like backend authenticates that connection).
    let (mut held, held_id) = log_in(&topo);
    assert!(uid_of(&held_id).starts_with(&old_nonce), "{held_id}");

    // New connections arrive all the time, before, during and after the hand-over.
    let clients = ClientLoop::start(&topo.client, Topology::gateway_addr(), "/loop");
    wait_for_requests(&acceptor, "/loop", &old_nonce, 3);
    let mut new = gateway.clone().subcommand("upgrade").start(&topo.gateway);
    let new_nonce = uid_nonce(&mut new);
    assert_ne!(new_nonce, old_nonce);
    wait_for_requests(&acceptor, "/loop", &new_nonce, 10);
    let (attempts, failures) = clients.stop();
    assert!(
        failures.is_empty(),
        "{} of {attempts} connection attempts failed during the upgrade: {failures:#?}",
        failures.len()
    );

    // The logged-in connection is still served by the old process, as the same user, with no new
    // handshake and the same id.
    let again = held.get("/held");
    assert_eq!(again["status"], 200, "{again}");
    let body = again["body"].as_str().unwrap_or_default();
    assert!(body.contains("user=user00"), "{body}");
    assert!(body.contains(&format!("conn_id={held_id}")), "{body}");
    assert_eq!(
        acceptor
            .requests()
            .iter()
            .filter(|r| r["path"] == "/held" && r["ntlm_message"].is_number())
            .count(),
        2,
        "one handshake (Type1, Type3), none after the upgrade"
    );

    // Every connection got an id of its own, from the process that accepted it.
    let ids = ids_for(&acceptor, "/loop");
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "ids never repeat: {ids:?}");
    assert!(!distinct.contains(&held_id));
    for id in &ids {
        let uid = uid_of(id);
        assert!(
            uid.starts_with(&old_nonce) || uid.starts_with(&new_nonce),
            "{id} comes from neither gateway"
        );
    }
    eprintln!("client loop: {attempts} attempts, {} ids", ids.len());
    let by_new = ids
        .iter()
        .filter(|id| uid_of(id).starts_with(&new_nonce))
        .count();

    // The new process identified its connections from its own kernel records: it attached its
    // program to the cgroup the listeners (and so the connections accepted from them) belong to.
    let metrics = new.admin_metrics();
    let from_kernel = sample(
        &metrics,
        "ntlm_tag_connections_total",
        "source=\"kernel-peer\"",
    )
    .expect("kernel-peer connections counted");
    assert!(
        from_kernel >= by_new as u64,
        "{from_kernel} kernel identities for {by_new} connections"
    );
    assert_eq!(
        sample(
            &metrics,
            "ntlm_tag_connections_total",
            "source=\"fallback\""
        ),
        Some(0),
        "no connection of the new process fell back to its peer address"
    );
    let kernel = new.admin_json("/kernel");
    assert_eq!(kernel_counter(&kernel, "lookup_misses"), 0, "{kernel:#}");
    assert!(
        old.wait_for_line(
            "upgrade: the successor accepts new connections now",
            scaled(Duration::from_secs(5))
        )
        .is_some()
    );

    // The new process's metrics show what the old one still serves: the logged-in connection.
    wait_for_metric(&new, "ntlm_tag_upgrade_predecessor_connections", 1);

    // The old process leaves once its last connection closes.
    held.close();
    let status = old
        .wait_for_exit(scaled(Duration::from_secs(20)))
        .expect("the old process exits once its last connection closed");
    assert!(status.success(), "{status}");
    // Exited, but its last lines may still be on their way through the pipe.
    assert!(
        old.wait_for_line(
            "the last connection of this process closed",
            scaled(Duration::from_secs(5))
        )
        .is_some(),
        "{:#?}",
        old.log()
    );
    assert!(
        !cgroup_of(old_pid).is_empty(),
        "the cgroup stays while the new process is in it"
    );
    for socket in ["upgrade.sock", "admin.sock"] {
        assert!(
            dir.path().join(socket).exists(),
            "the old process leaves {socket} to the new one"
        );
    }

    wait_for_metric(&new, "ntlm_tag_upgrade_predecessor_connections", 0);
    wait_for_metric(
        &new,
        "ntlm_tag_upgrade_predecessor_deadline_closed_connections_total",
        0,
    );

    // And the new process serves on, then leaves nothing behind: the shared cgroup (and with it
    // both processes' attachments) is gone.
    wait_for_requests(&acceptor, "/loop", &new_nonce, 10);
    let status = new.stop();
    assert!(status.success(), "{status}");
    assert_eq!(cgroup_of(old_pid), Vec::<std::path::PathBuf>::new());
    for socket in ["upgrade.sock", "admin.sock"] {
        assert!(!dir.path().join(socket).exists(), "{socket} is removed");
    }
}

#[test]
fn at_the_upgrade_drain_deadline_the_old_process_closes_what_is_left_and_says_how_many() {
    // Bound, not `..`: the backend and the directory must live as long as the test.
    let Scene {
        topo,
        gateway,
        acceptor: _acceptor,
        dir: _dir,
    } = Scene::new("[timeouts]\nupgrade_drain_secs = 1\n");
    let mut old = gateway.start(&topo.gateway);
    let (mut held, _) = log_in(&topo);
    let upgraded_at = Instant::now();
    let new = gateway.clone().subcommand("upgrade").start(&topo.gateway);
    let status = old
        .wait_for_exit(scaled(Duration::from_secs(20)))
        .expect("the old process exits at its drain deadline");
    assert!(status.success(), "{status}");
    assert!(upgraded_at.elapsed() >= Duration::from_secs(1));
    let line = old
        .wait_for_line(
            "upgrade drain deadline passed",
            scaled(Duration::from_secs(5)),
        )
        .expect("the deadline is logged");
    assert!(line.contains("connections=1"), "{line}");
    wait_for_metric(
        &new,
        "ntlm_tag_upgrade_predecessor_deadline_closed_connections_total",
        1,
    );
    wait_for_metric(&new, "ntlm_tag_upgrade_predecessor_connections", 0);
    let after = held.get("/held");
    assert!(
        after.get("error").is_some(),
        "the held connection is closed: {after}"
    );
    drop(held);
    // A new login goes to the new process.
    let (held, _) = log_in(&topo);
    held.close();
    assert!(new.stop().success());
}

#[test]
fn an_upgrade_without_a_running_gateway_fails_and_a_second_plain_start_is_refused() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = gateway(dir.path());
    let Started::Exited { status, log } = gateway
        .clone()
        .subcommand("upgrade")
        .try_start(&topo.gateway)
    else {
        panic!("an upgrade with nothing to take over from must not start");
    };
    assert_eq!(status.code(), Some(1));
    assert!(
        log.iter()
            .any(|l| l.contains("cannot reach a running gateway")),
        "{log:#?}"
    );

    let running = gateway.start(&topo.gateway);
    let Started::Exited { status, log } = gateway.try_start(&topo.gateway) else {
        panic!("a second gateway on a live upgrade socket must not start");
    };
    assert_eq!(status.code(), Some(1));
    assert!(
        log.iter()
            .any(|l| l.contains("is the upgrade socket of a running gateway")),
        "{log:#?}"
    );
    assert!(running.stop().success());
}

/// Sends SIGTERM to a process that is not our child (the detached gateway) when dropped, and waits
/// for it to go.
struct Detached(i32);

impl Detached {
    fn stop(&self) -> bool {
        // SAFETY: signalling a process this test started (through `ntlm-tag upgrade`).
        unsafe { libc::kill(self.0, libc::SIGTERM) };
        let deadline = Instant::now() + scaled(Duration::from_secs(15));
        while Path::new(&format!("/proc/{}", self.0)).exists() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if Path::new(&format!("/proc/{}", self.0)).exists() {
            self.stop();
        }
    }
}

#[test]
fn an_upgrade_typed_at_a_terminal_returns_once_the_new_gateway_serves_and_leaves_it_running() {
    let Scene {
        topo,
        acceptor,
        gateway,
        dir: _dir,
    } = Scene::new("");
    let mut old = gateway.start(&topo.gateway);
    let old_nonce = uid_nonce(&mut old);

    // `script` gives the command a terminal, as an operator's shell would.
    let command = format!(
        "nsenter --net={} -- {} upgrade {}",
        topo.gateway.path().display(),
        ntlm_tag_tests::gateway::binary().display(),
        gateway.command_line().join(" ")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ntlm-tag: upgrade done: pid "))
        .unwrap_or_else(|| panic!("the command says the upgrade is done: {stdout}"));
    let pid: i32 = line["ntlm-tag: upgrade done: pid ".len()..]
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the new gateway's pid");
    let new = Detached(pid);

    // The command returned, the old gateway (with nothing to drain) exited, and the new one serves.
    let status = old
        .wait_for_exit(scaled(Duration::from_secs(20)))
        .expect("the old gateway exits");
    assert!(status.success());
    topo.client
        .run(|| async { one_request(Topology::gateway_addr(), "/after").await })
        .expect("the new gateway serves");
    let ids = ids_for(&acceptor, "/after");
    assert_eq!(ids.len(), 1);
    assert!(!uid_of(&ids[0]).starts_with(&old_nonce), "{ids:?}");
    // Once it had the sockets, the new gateway logged where the old one did.
    assert!(
        old.wait_for_line_where(
            |l| l.contains("ntlm-tag ready") && !l.contains(&old_nonce),
            scaled(Duration::from_secs(5))
        )
        .is_some(),
        "{:#?}",
        old.log()
    );
    assert!(new.stop(), "the new gateway stops on SIGTERM");
}

/// The `MAINPID=` notifications `socket` holds right now (it does not wait).
fn main_pid_notices(socket: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    socket.set_nonblocking(true).expect("non-blocking");
    let mut buf = vec![0u8; 4096];
    let mut found = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.contains("MAINPID=") {
            found.push(message);
        }
    }
    found
}

/// The parent of process `pid` (`/proc/PID/stat`, the field after the state).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn under_systemd_the_new_gateway_names_itself_the_main_process_only_once_its_starter_exited() {
    // systemd can only wait for (and so drain on a stop) a main process that is its own child:
    // the new gateway must not send MAINPID= while the hand-over script that started it runs.
    let Scene {
        topo,
        acceptor: _acceptor,
        gateway,
        dir,
    } = Scene::new("");
    let notify_path = dir.path().join("notify.sock");
    let notify =
        std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let mut old = gateway
        .clone()
        .env("NOTIFY_SOCKET", &notify_path.display().to_string())
        .start(&topo.gateway);
    uid_nonce(&mut old);

    // What the unit's hand-over script does: read the first line through a FIFO, leave the gateway
    // running; then (unlike the script) stay until the test closes stdin.
    let starter = r#"fifo=$1 log=$2; shift 2; mkfifo "$fifo"; "$@" >"$fifo" 2>"$log" & head -n 1 "$fifo"; read _ || true"#;
    let mut command = vec![
        "-c".to_string(),
        starter.to_string(),
        "starter".to_string(),
        dir.path().join("said").display().to_string(),
        dir.path().join("new.log").display().to_string(),
        "nsenter".to_string(),
        format!("--net={}", topo.gateway.path().display()),
        "--".to_string(),
        ntlm_tag_tests::gateway::binary().display().to_string(),
        "upgrade".to_string(),
    ];
    command.extend(gateway.command_line());
    let mut starter = std::process::Command::new("sh")
        .args(&command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the starter");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(starter.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read the starter's line");
    let pid: i32 = line
        .strip_prefix("ntlm-tag: upgrade done: pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.path().join("new.log")).unwrap_or_default();
            panic!("no upgrade done line: {line:?}; the new gateway said: {log}")
        });
    let new = Detached(pid);
    assert_eq!(
        parent_of(pid),
        Some(starter.id() as i32),
        "started by the starter"
    );
    // Said before the line, the notification would be queued already.
    let early = main_pid_notices(&notify);
    assert!(
        early.is_empty(),
        "MAINPID= while its starter still runs: {early:?}"
    );

    drop(starter.stdin.take());
    assert!(starter.wait().expect("the starter exits").success());
    let expected = format!("MAINPID={pid}\nREADY=1\n");
    eventually_within(
        "MAINPID= once the starter exited",
        scaled(Duration::from_secs(10)),
        || main_pid_notices(&notify),
        |notices| notices.contains(&expected),
    );
    assert_ne!(parent_of(pid), Some(starter.id() as i32));

    topo.client
        .run(|| async { one_request(Topology::gateway_addr(), "/after").await })
        .expect("the new gateway serves");
    let status = old
        .wait_for_exit(scaled(Duration::from_secs(20)))
        .expect("the old gateway exits");
    assert!(status.success());
    assert!(new.stop(), "the new gateway stops on SIGTERM");
}

/// The id of the XDP program interface `dev` runs in `ns` (`ip -d link`), if any.
fn xdp_program_on(ns: &NetNs, dev: &str) -> Option<u64> {
    let out = ns
        .command("ip")
        .args(["-j", "-d", "link", "show", "dev", dev])
        .output()
        .expect("ip link");
    assert!(out.status.success(), "ip link show dev {dev}");
    let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let xdp = &links[0]["xdp"];
    xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
}

/// The id of the XDP program `gateway` says it attached (`/kernel`).
fn own_xdp_program(gateway: &Gateway) -> u64 {
    let kernel = gateway.admin_json("/kernel");
    kernel["xdp"][0]["program_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("an XDP program id in /kernel: {kernel:#}"))
}

/// The row of `/connections` for the client at `client` (`ip:port`).
fn connection_row(gateway: &Gateway, client: &str) -> Value {
    let rows = gateway.admin_json("/connections");
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["client"] == client)
        .cloned()
        .unwrap_or_else(|| panic!("no row for {client}: {rows:#}"))
}

/// A keep-alive login through the tunnel from client address `i`, served by `gateway` (whose ids
/// start with `nonce`), which must name the real client and its balancer, learned from the tunnel.
fn tunnelled_login(
    topo: &IpipTopology,
    gateway: &Gateway,
    nonce: &str,
    i: u8,
) -> (KeepAliveLogin, String) {
    let (login, id) = log_in_from(
        &topo.client,
        IpipTopology::client_v4(i),
        IpipTopology::vip(),
    );
    assert!(uid_of(&id).starts_with(nonce), "{id}");
    assert!(
        id.starts_with(&format!("{}:", IpipTopology::client_v4(i))),
        "{id}"
    );
    let row = connection_row(gateway, client_of(&id));
    assert_eq!(row["learned_from"], "ipip", "{row:#}");
    assert_eq!(row["balancer"], SNAT_SOURCE, "{row:#}");
    (login, id)
}

/// The client part (`ip:port`) of a connection id.
fn client_of(id: &str) -> &str {
    id.rsplit_once('/').map_or("", |(client, _)| client)
}

/// The IPIP topology with an IIS-like backend, the test balancer encapsulating towards the
/// gateway's virtual IP, and gateways that decapsulate with XDP on `down0`, with their upgrade and
/// admin sockets in a directory of their own.
struct TunnelScene {
    topo: IpipTopology,
    acceptor: Acceptor,
    dir: tempfile::TempDir,
    gateway: GatewayBuilder,
    _encap: IpipEncap,
}

impl TunnelScene {
    fn new() -> TunnelScene {
        let topo = IpipTopology::new();
        let acceptor = Acceptor::start(
            &topo.backend,
            Topology::backend_addr(),
            &users(),
            Keying::Connection,
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let admin = format!("unix:{}", dir.path().join("admin.sock").display());
        let gateway = gateway(dir.path()).listen(IpipTopology::vip()).args(&[
            "--admin",
            &admin,
            "--trusted-lb",
            &format!("{SNAT_SOURCE}/32"),
            "--xdp",
            "down0",
        ]);
        let encap = IpipEncap::attach(
            &topo.balancer,
            "up0",
            IPIP_VIP.parse().expect("vip"),
            SNAT_SOURCE.parse().expect("src"),
            std::net::Ipv4Addr::new(198, 18, 1, 1),
        );
        TunnelScene {
            topo,
            acceptor,
            dir,
            gateway,
            _encap: encap,
        }
    }
}

#[test]
fn an_upgrade_with_xdp_swaps_the_program_in_the_link_and_keeps_tunnelled_logins_on_the_old_process()
{
    let TunnelScene {
        topo,
        acceptor,
        dir: _dir,
        gateway,
        _encap,
    } = TunnelScene::new();
    let mut old = gateway.start(&topo.gateway);
    let old_nonce = uid_nonce(&mut old);
    let old_program = own_xdp_program(&old);
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), Some(old_program));

    // A user logs in through the tunnel on a keep-alive connection; the old process learned the
    // client and its balancer from the tunnel.
    let (mut held, held_id) = tunnelled_login(&topo, &old, &old_nonce, 0);

    // New tunnelled connections arrive all the time, before, during and after the hand-over:
    // this kernel has no IPIP module, so any moment without XDP decapsulation fails them.
    let clients = ClientLoop::start(&topo.client, IpipTopology::vip(), "/loop");
    wait_for_requests(&acceptor, "/loop", &old_nonce, 3);
    let mut new = gateway.clone().subcommand("upgrade").start(&topo.gateway);
    let new_nonce = uid_nonce(&mut new);
    wait_for_requests(&acceptor, "/loop", &new_nonce, 10);
    let (attempts, failures) = clients.stop();
    assert!(
        failures.is_empty(),
        "{} of {attempts} tunnelled connection attempts failed during the upgrade: {failures:#?}",
        failures.len()
    );

    // The interface runs the new process's program, swapped into the link the old process
    // attached (one attachment, no second one).
    let new_program = own_xdp_program(&new);
    assert_ne!(new_program, old_program);
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), Some(new_program));
    assert!(
        new.log()
            .iter()
            .any(|l| l.contains("XDP on this interface runs this process's program now")),
        "{:#?}",
        new.log()
    );

    // The logged-in connection is still the old process's: same user, same id, no new handshake.
    let again = held.get("/held");
    assert_eq!(again["status"], 200, "{again}");
    let body = again["body"].as_str().unwrap_or_default();
    assert!(body.contains("user=user00"), "{body}");
    assert!(body.contains(&format!("conn_id={held_id}")), "{body}");
    let handshakes = || {
        acceptor
            .requests()
            .iter()
            .filter(|r| r["path"] == "/held" && r["ntlm_message"].is_number())
            .count()
    };
    assert_eq!(handshakes(), 2, "one handshake (Type1, Type3)");

    // A new tunnelled login is the new process's, which names the client and its balancer.
    let (second, _) = tunnelled_login(&topo, &new, &new_nonce, 2);
    second.close();

    // The old process leaves once its connection closed; the link, and the new program in it,
    // stay attached.
    held.close();
    let status = old
        .wait_for_exit(scaled(Duration::from_secs(20)))
        .expect("the old process exits once its last connection closed");
    assert!(status.success(), "{status}");
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), Some(new_program));
    topo.client
        .run(|| async { one_request(IpipTopology::vip(), "/after").await })
        .expect("tunnelled connections are decapsulated after the old process left");
    let kernel = new.admin_json("/kernel");
    assert!(kernel_counter(&kernel, "ipip_joined") >= 2, "{kernel:#}");

    // The last process to hold the link detaches XDP when it stops.
    assert!(new.stop().success());
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), None);
}

#[test]
fn an_upgrade_that_fails_after_the_offer_leaves_the_old_xdp_program_attached_and_decapsulating() {
    let TunnelScene {
        topo,
        acceptor,
        dir: _dir,
        gateway,
        _encap,
    } = TunnelScene::new();
    let mut old = gateway.start(&topo.gateway);
    let old_nonce = uid_nonce(&mut old);
    let old_program = own_xdp_program(&old);

    // The new configuration adds a listener on an address something else holds: the successor
    // takes the offer (sockets and XDP link), loads its programs, then cannot bind and exits.
    let taken: SocketAddr = format!("{IPIP_VIP}:8099").parse().expect("addr");
    let holder = {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = topo.gateway.spawn(move || async move {
            let listener = std::net::TcpListener::bind(taken).expect("hold the port");
            tx.send(()).expect("ready");
            let _ = stop_rx.recv();
            drop(listener);
        });
        rx.recv().expect("the port is held");
        (stop_tx, thread)
    };
    let Started::Exited { status, log } = gateway
        .clone()
        .listen(taken)
        .subcommand("upgrade")
        .try_start(&topo.gateway)
    else {
        panic!("an upgrade that cannot bind must not start");
    };
    drop(holder);
    assert_eq!(status.code(), Some(1), "{log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("received the running gateway's sockets")),
        "the failure came after the offer: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("cannot listen on {taken}"))),
        "{log:#?}"
    );
    assert!(
        old.wait_for_line("upgrade did not happen", scaled(Duration::from_secs(10)))
            .is_some()
    );

    // The old program still runs on the interface, decapsulates, and the old process names the
    // tunnelled client and its balancer.
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), Some(old_program));
    let (held, _) = tunnelled_login(&topo, &old, &old_nonce, 1);
    held.close();
    assert!(!ids_for(&acceptor, "/held").is_empty());
    assert!(old.stop().success());
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), None);
}

/// A process of the test's own (a successor started without waiting for it), killed when dropped.
struct Spawned {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Spawned {
    /// `ntlm-tag upgrade` with `gateway`'s arguments in `ns`, its log read line by line.
    fn upgrade(ns: &NetNs, gateway: &GatewayBuilder) -> Spawned {
        use std::io::BufRead as _;
        let mut child = ns
            .command(ntlm_tag_tests::gateway::binary().to_str().expect("utf-8"))
            .arg("upgrade")
            .args(gateway.command_line())
            .env("NTLM_TAG_LOG", "info,ntlm_tag=debug")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ntlm-tag upgrade");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Spawned { child, lines }
    }

    /// Waits for a log line containing `needle`; panics with what came instead.
    fn wait_for_line(&self, needle: &str) {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?} from the successor: {seen:#?}");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGCONT to a process the test stopped, when dropped (also when the test fails).
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: signalling a gateway this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

#[test]
fn a_successor_killed_after_swapping_its_xdp_program_in_leaves_the_old_process_its_own_back() {
    let TunnelScene {
        topo,
        acceptor: _acceptor,
        dir: _dir,
        gateway,
        _encap,
    } = TunnelScene::new();
    let old = gateway.start(&topo.gateway);
    let old_program = own_xdp_program(&old);
    let (mut held, held_id) = log_in_from(
        &topo.client,
        IpipTopology::client_v4(0),
        IpipTopology::vip(),
    );

    // The old process is held still once it made its offer, so that it cannot release before
    // the successor swapped its program in; then the successor dies, as in a crash.
    let successor = Spawned::upgrade(&topo.gateway, &gateway);
    successor.wait_for_line("received the running gateway's sockets");
    old.signal(libc::SIGSTOP);
    let stopped = Stopped(old.pid());
    successor.wait_for_line("XDP on this interface runs this process's program now");
    assert_ne!(xdp_program_on(&topo.gateway, "down0"), Some(old_program));
    drop(successor);
    drop(stopped);

    // The old process finds its link running a program not its own, and puts its own back.
    assert!(
        old.wait_for_line(
            "this process's program runs on the interface again",
            scaled(Duration::from_secs(20))
        )
        .is_some(),
        "{:#?}",
        old.log()
    );
    assert_eq!(xdp_program_on(&topo.gateway, "down0"), Some(old_program));
    let again = held.get("/held");
    assert_eq!(again["status"], 200, "{again}");
    let body = again["body"].as_str().unwrap_or_default();
    assert!(body.contains(&format!("conn_id={held_id}")), "{body}");
    held.close();
}

#[test]
fn a_successor_stuck_on_its_key_file_exits_75_at_its_ready_timeout_and_the_old_gateway_serves_on() {
    let Scene {
        topo,
        acceptor,
        dir,
        gateway,
    } = Scene::new("");
    let mut old = gateway.start(&topo.gateway);
    let old_nonce = uid_nonce(&mut old);
    let (mut held, held_id) = log_in(&topo);
    let clients = ClientLoop::start(&topo.client, Topology::gateway_addr(), "/loop");
    wait_for_requests(&acceptor, "/loop", &old_nonce, 3);

    // The new configuration's listener key is a FIFO nobody writes: reading it blocks for ever.
    let (cert, _) = ntlm_tag_tests::fixtures::self_signed(dir.path(), "gateway.test");
    let key = dir.path().join("fifo.key");
    let made = std::process::Command::new("mkfifo")
        .arg(&key)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let stuck_config = ntlm_tag_tests::fixtures::write(
        dir.path(),
        "stuck.toml",
        &format!(
            "listen = [{{ address = \"{}\", tls = [{{ cert = \"{cert}\", key = \"{}\" }}] }}]\n\
             backends = [\"{}\"]\n",
            Topology::gateway_addr(),
            key.display(),
            Topology::backend_addr(),
        ),
    );
    let admin = format!("unix:{}", dir.path().join("admin.sock").display());
    let stuck = Gateway::from_config(&stuck_config)
        .subcommand("upgrade")
        .ebpf("required")
        .args(&[
            "--upgrade-socket",
            &dir.path().join("upgrade.sock").display().to_string(),
            "--admin",
            &admin,
            "--ready-timeout",
            "3",
        ]);
    let started = Instant::now();
    let Started::Exited { status, log } = stuck.try_start(&topo.gateway) else {
        panic!("a successor that cannot read its key must not take over");
    };
    let took = started.elapsed();
    assert_eq!(status.code(), Some(75), "it exits by itself, 75: {log:#?}");
    assert!(
        took >= Duration::from_secs(3),
        "not before its deadline: {took:?}"
    );
    let said = log
        .iter()
        .find(|l| l.contains("not ready to take over within --ready-timeout (3 s)"))
        .unwrap_or_else(|| panic!("the deadline is logged: {log:#?}"));
    assert!(
        said.contains("stuck reading the configuration and the files it names"),
        "{said}"
    );

    // The old gateway served throughout, kept its logged-in connection, and still takes every new
    // connection (its nonce only).
    wait_for_requests(
        &acceptor,
        "/loop",
        &old_nonce,
        ids_for(&acceptor, "/loop").len() + 3,
    );
    let (attempts, failures) = clients.stop();
    assert!(
        failures.is_empty(),
        "{} of {attempts} connection attempts failed around the stuck upgrade: {failures:#?}",
        failures.len()
    );
    let ids = ids_for(&acceptor, "/loop");
    assert!(
        ids.iter().all(|id| uid_of(id).starts_with(&old_nonce)),
        "{ids:?}"
    );
    let again = held.get("/held");
    assert_eq!(again["status"], 200, "{again}");
    assert!(
        again["body"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("conn_id={held_id}")),
        "{again}"
    );

    // The next upgrade, with a readable configuration, takes over.
    let mut new = gateway.clone().subcommand("upgrade").start(&topo.gateway);
    let new_nonce = uid_nonce(&mut new);
    // The old gateway never released its listeners to the stuck one: the first hand-over it logs
    // is to this successor (a line for the stuck one would have come before it).
    let handed_over = old
        .wait_for_line(
            "upgrade: the successor accepts",
            scaled(Duration::from_secs(5)),
        )
        .expect("the hand-over is logged");
    assert!(
        handed_over.contains(&format!("successor={}", new.pid())),
        "{handed_over}"
    );
    topo.client
        .run(|| async { one_request(Topology::gateway_addr(), "/after").await })
        .expect("the new gateway serves");
    let after = ids_for(&acceptor, "/after");
    assert_eq!(after.len(), 1);
    assert!(uid_of(&after[0]).starts_with(&new_nonce), "{after:?}");
    held.close();
    let status = old
        .wait_for_exit(scaled(Duration::from_secs(20)))
        .expect("the old process exits once its last connection closed");
    assert!(status.success(), "{status}");
    assert!(new.stop().success());
}
