//! A real HAProxy (Debian's `/usr/sbin/haproxy`) in front of the gateway, speaking the PROXY protocol,
//! and the namespaces it runs in. HAProxy is stopped and its config file removed on drop.
//!
//! ```text
//!  client ns                 balancer ns (HAProxy, mode tcp)               gateway ns                 backend ns
//!  198.18.10.10.. ──veth──  198.18.10.1:80       | 198.18.1.100   ──veth──  198.18.1.1:8080 | 198.18.2.1 ── 198.18.2.2:8081
//!  fd00:5418:10::10..       [fd00:5418:10::1]:80 | fd00:5418:1::100         [fd00:5418:1::1]:8080
//! ```
//!
//! Unlike [`SnatTopology`](crate::topology::SnatTopology) there are no NAT rules and, unless
//! [`HaproxyTopology::route_clients_to_gateway`] is called, no forwarding: a client reaches the gateway
//! only through HAProxy.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    netns::{NetNs, addr, run_in},
    topology::{BACKEND_PORT, BACKEND_V4, GATEWAY_PORT, GATEWAY_V4},
    wait::scaled,
};

/// The HAProxy binary: `$HAPROXY_BIN`, or Debian's.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("HAPROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    assert!(
        path.is_file(),
        "{} not found: apt-get install -y haproxy (cargo xtask setup)",
        path.display()
    );
    path
}

/// Which PROXY protocol header HAProxy puts in front of every server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    /// `send-proxy`: the text header, `PROXY TCP4 ...\r\n`.
    V1,
    /// `send-proxy-v2`: the binary header.
    V2,
}

impl SendProxy {
    fn keyword(self) -> &'static str {
        match self {
            SendProxy::V1 => "send-proxy",
            SendProxy::V2 => "send-proxy-v2",
        }
    }
}

/// What one HAProxy instance does: accept on `frontend`, relay to the single server `server` with a
/// PROXY header.
#[derive(Debug, Clone)]
pub struct HaproxyOptions {
    pub frontend: SocketAddr,
    pub server: SocketAddr,
    pub send_proxy: SendProxy,
    /// HTTP health checks of the server (`check check-send-proxy` + `option httpchk GET <path>`), every
    /// 200 ms. HAProxy opens its check connections itself, so their PROXY header is a LOCAL one
    /// (`PROXY UNKNOWN` in v1).
    pub http_check: Option<String>,
}

impl HaproxyOptions {
    pub fn new(frontend: SocketAddr, server: SocketAddr, send_proxy: SendProxy) -> Self {
        HaproxyOptions {
            frontend,
            server,
            send_proxy,
            http_check: None,
        }
    }

    pub fn with_http_check(mut self, path: &str) -> Self {
        self.http_check = Some(path.to_string());
        self
    }

    /// The configuration file's text.
    pub fn render(&self) -> String {
        let (check_options, server_check) = match &self.http_check {
            Some(path) => (
                format!("    option httpchk GET {path}\n"),
                " check check-send-proxy inter 200ms",
            ),
            None => (String::new(), ""),
        };
        format!(
            "global
    maxconn 256
    nbthread 1

defaults
    mode tcp
    retries 0
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 5s

frontend fe
    bind {frontend}
    # Relay a connection only once the client has sent something: the readiness probe (connect,
    # close) then never reaches the gateway, and every gateway connection is a real client's.
    tcp-request inspect-delay 30s
    tcp-request content accept if {{ req.len gt 0 }}
    tcp-request content reject
    default_backend gw

backend gw
{check_options}    server gw {server} {send_proxy}{server_check}
",
            frontend = haproxy_address(self.frontend),
            server = haproxy_address(self.server),
            send_proxy = self.send_proxy.keyword(),
        )
    }
}

/// An address as HAProxy's configuration spells it (`ipv6@` avoids any doubt about the colons).
fn haproxy_address(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("ipv6@{}:{}", v6.ip(), v6.port()),
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running `haproxy -db -f <cfg>` inside a namespace.
pub struct Haproxy {
    child: Option<Child>,
    config: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub options: HaproxyOptions,
}

impl Haproxy {
    /// Writes the configuration, starts HAProxy in `ns` and waits until its frontend accepts
    /// connections. Panics (with HAProxy's stderr) if it exits or does not listen within 20 s.
    pub fn start(ns: &NetNs, options: HaproxyOptions) -> Haproxy {
        let config = std::env::temp_dir().join(format!(
            "ntlm-tag-haproxy-{}-{}.cfg",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config, options.render())
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let mut cmd = ns.command(binary().to_str().expect("utf-8 path"));
        cmd.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut haproxy = Haproxy {
            child: None,
            config,
            stderr: Arc::new(Mutex::new(Vec::new())),
            reader: None,
            options,
        };
        // From here on, Drop removes the file (and stops the process) whatever happens.
        let mut child = cmd.spawn().expect("spawn haproxy");
        let pipe = child.stderr.take().expect("piped stderr");
        haproxy.child = Some(child);
        let stderr = Arc::clone(&haproxy.stderr);
        haproxy.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[haproxy] {line}");
                stderr.lock().expect("stderr").push(line);
            }
        }));
        // Only stops a stuck start: HAProxy under emulation on a loaded host can take longer.
        haproxy.wait_until_listening(ns, scaled(Duration::from_secs(20)));
        haproxy
    }

    /// Polls a TCP connect to the frontend from inside `ns` until it succeeds.
    fn wait_until_listening(&mut self, ns: &NetNs, timeout: Duration) {
        let frontend = self.options.frontend;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "haproxy exited ({status}) before it listened on {frontend}:\n{}\nconfiguration:\n{}",
                    self.drain_stderr().join("\n"),
                    self.options.render()
                );
            }
            let connected = run_in(&ns.path(), move || async move {
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(frontend),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            });
            if connected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {frontend} within {timeout:?}; stderr so far:\n{}",
                self.stderr().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// HAProxy's stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr").clone()
    }

    /// Waits for the stderr reader to see the end of the pipe (the process has exited), then
    /// returns everything it read.
    fn drain_stderr(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.stderr()
    }

    /// Stops HAProxy (SIGTERM, SIGKILL after 5 s) and reaps it.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child process, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    break child.wait().expect("wait haproxy");
                }
            }
        };
        self.drain_stderr();
        Some(status)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Clients → HAProxy's balancer → gateway → backend, without NAT (see the module docs).
pub struct HaproxyTopology {
    pub client: NetNs,
    pub balancer: NetNs,
    pub gateway: NetNs,
    pub backend: NetNs,
}

/// The balancer's address on the clients' side (HAProxy's frontend).
pub const FRONT_V4: &str = "198.18.10.1";
pub const FRONT_V6: &str = "fd00:5418:10::1";
/// The balancer's address on the gateway's side: the source of HAProxy's server connections.
pub const BALANCER_V4: &str = "198.18.1.100";
pub const BALANCER_V6: &str = "fd00:5418:1::100";
pub const GATEWAY_V6: &str = "fd00:5418:1::1";
pub const FRONT_PORT: u16 = 80;

impl HaproxyTopology {
    pub fn new() -> HaproxyTopology {
        let (client, balancer, gateway, backend) = crate::topology::balanced_chain();
        for i in 0..4 {
            addr(&client, "eth0", &format!("198.18.10.{}/24", 10 + i));
            addr(&client, "eth0", &format!("fd00:5418:10::{:x}/64", 0x10 + i));
        }
        addr(&balancer, "down0", &format!("{FRONT_V4}/24"));
        addr(&balancer, "down0", &format!("{FRONT_V6}/64"));
        addr(&balancer, "up0", &format!("{BALANCER_V4}/24"));
        addr(&balancer, "up0", &format!("{BALANCER_V6}/64"));
        addr(&gateway, "down0", &format!("{GATEWAY_V4}/24"));
        addr(&gateway, "down0", &format!("{GATEWAY_V6}/64"));
        addr(&gateway, "up0", "198.18.2.1/24");
        addr(&backend, "eth0", &format!("{BACKEND_V4}/24"));
        HaproxyTopology {
            client,
            balancer,
            gateway,
            backend,
        }
    }

    /// Lets clients reach the gateway directly, by plain IPv4 routing through the balancer's
    /// namespace (forwarding on, routes both ways), bypassing HAProxy.
    pub fn route_clients_to_gateway(&self) {
        let mut sysctl = self.balancer.command("sysctl");
        sysctl.args(["-qw", "net.ipv4.ip_forward=1"]);
        assert!(sysctl.status().expect("sysctl").success(), "ip_forward");
        self.client
            .ip(&["route", "add", "198.18.1.0/24", "via", FRONT_V4]);
        self.gateway
            .ip(&["route", "add", "198.18.10.0/24", "via", BALANCER_V4]);
    }

    /// The i-th client IPv4 address.
    pub fn client_v4(i: u8) -> IpAddr {
        format!("198.18.10.{}", 10 + i).parse().expect("address")
    }

    /// The i-th client IPv6 address.
    pub fn client_v6(i: u8) -> IpAddr {
        format!("fd00:5418:10::{:x}", 0x10 + i)
            .parse()
            .expect("address")
    }

    /// HAProxy's IPv4 frontend.
    pub fn front_v4() -> SocketAddr {
        SocketAddr::new(FRONT_V4.parse().expect("address"), FRONT_PORT)
    }

    /// HAProxy's IPv6 frontend.
    pub fn front_v6() -> SocketAddr {
        SocketAddr::new(FRONT_V6.parse().expect("address"), FRONT_PORT)
    }

    pub fn balancer_v4() -> IpAddr {
        BALANCER_V4.parse().expect("address")
    }

    pub fn balancer_v6() -> IpAddr {
        BALANCER_V6.parse().expect("address")
    }

    pub fn gateway_v4() -> SocketAddr {
        SocketAddr::new(GATEWAY_V4.parse().expect("address"), GATEWAY_PORT)
    }

    pub fn gateway_v6() -> SocketAddr {
        SocketAddr::new(GATEWAY_V6.parse().expect("address"), GATEWAY_PORT)
    }

    pub fn backend() -> SocketAddr {
        SocketAddr::new(BACKEND_V4.parse().expect("address"), BACKEND_PORT)
    }
}

impl Default for HaproxyTopology {
    fn default() -> Self {
        Self::new()
    }
}
