//! The real NTLM acceptor (`tests/acceptor`, binary `ntlm-acceptor`) as a test backend, and `curl
//! --ntlm` as a real client.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{acceptor_log::AcceptorLog, netns::NetNs, topology::Topology, wait::scaled};

pub fn binary() -> PathBuf {
    let path = std::env::var_os("NTLM_ACCEPTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ntlm-acceptor")
        });
    assert!(
        path.is_file(),
        "{} not found: `cargo build -p ntlm-tag-test-acceptor` (cargo xtask test does)",
        path.display()
    );
    path
}

/// The acceptor's `--user` list from `(user, password)` pairs.
pub fn users(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(user, password)| (user.to_string(), password.to_string()))
        .collect()
}

/// `n` users `user00`, `user01`, … with passwords `Secret-0!`, `Secret-1!`, …
pub fn numbered_users(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("user{i:02}"), format!("Secret-{i}!")))
        .collect()
}

/// Backends A and B of the standard topology (ports 8081 and 8082), with the same `users`.
pub fn two_backends(
    ns: &NetNs,
    users: &[(String, String)],
    keying: Keying,
) -> (Acceptor, Acceptor) {
    (
        Acceptor::start(ns, Topology::backend_at(8081), users, keying),
        Acceptor::start(ns, Topology::backend_at(8082), users, keying),
    )
}

/// How the acceptor keys NTLM security contexts.
#[derive(Debug, Clone, Copy)]
pub enum Keying {
    /// By the `Jespa-Connection-Id` header (a pooling proxy in front, the Jespa way).
    Header,
    /// By its own TCP connection (the IIS way).
    Connection,
}

/// A running acceptor and the JSON lines it logged (one per request).
pub struct Acceptor {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: AcceptorLog,
}

impl Acceptor {
    pub fn start(
        ns: &NetNs,
        addr: SocketAddr,
        users: &[(String, String)],
        keying: Keying,
    ) -> Acceptor {
        Self::start_with(ns, addr, users, keying, &[])
    }

    /// Like [`start`](Self::start), with more flags (e.g. `--tls-cert FILE --tls-key FILE`).
    pub fn start_with(
        ns: &NetNs,
        addr: SocketAddr,
        users: &[(String, String)],
        keying: Keying,
        extra: &[&str],
    ) -> Acceptor {
        let mut cmd = ns.command(binary().to_str().expect("path"));
        cmd.args(extra);
        cmd.args(["--listen", &addr.to_string(), "--key"])
            .arg(match keying {
                Keying::Header => "header",
                Keying::Connection => "connection",
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (user, password) in users {
            cmd.args(["--user", &format!("{user}:{password}")]);
        }
        let mut child = cmd.spawn().expect("spawn ntlm-acceptor");
        let stdout = child.stdout.take().expect("stdout");
        let log = AcceptorLog::new(stdout);
        if !log.wait_ready(scaled(Duration::from_secs(20))) {
            let _ = child.kill();
            panic!("ntlm-acceptor on {addr} did not become ready");
        }
        Acceptor {
            child: Some(child),
            addr,
            log,
        }
    }

    pub fn requests(&self) -> Vec<Value> {
        self.log.records()
    }

    /// Distinct upstream TCP connections that carried requests (excluding health checks:
    /// `/healthz` and `<vdir>/healthcheck.htm`).
    pub fn tcp_connections(&self) -> usize {
        let mut conns: Vec<u64> = self
            .requests()
            .iter()
            .filter(|r| {
                r["path"] != "/healthz"
                    && !r["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/healthcheck.htm"))
            })
            .filter_map(|r| r["conn"].as_u64())
            .collect();
        conns.sort_unstable();
        conns.dedup();
        conns.len()
    }

    /// Waits (up to `timeout`) until a logged request satisfies `check`; panics naming `what`.
    pub fn wait_for_request(&self, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) {
        crate::wait::eventually_within(
            &format!("acceptor {}: a request {what}", self.addr),
            timeout,
            || self.requests(),
            |requests| requests.iter().any(&check),
        );
    }

    /// Kills the acceptor now (a backend dying).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The output of one curl run.
#[derive(Debug)]
pub struct CurlRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CurlRun {
    /// The last status curl printed with `-w "\ncode=%{http_code}\n"` (the handshake's final one).
    pub fn final_status(&self) -> u16 {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("code="))
            .next_back()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("no status in {}", self.stdout))
    }

    /// The users the bodies named, in order (`user=NAME` lines).
    pub fn users(&self) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("user=").map(str::to_string))
            .collect()
    }
}

/// `curl --ntlm -u user:password` from `source` in `ns`, fetching every URL on one connection.
pub fn curl_ntlm(
    ns: &NetNs,
    source: std::net::IpAddr,
    user: &str,
    password: &str,
    urls: &[String],
    extra: &[&str],
) -> CurlRun {
    let mut cmd: Command = ns.command("curl");
    cmd.args(["-sS", "--max-time", "20", "--ntlm", "-u"])
        .arg(format!("{user}:{password}"))
        .args(["--interface", &source.to_string()])
        .args(extra)
        .args(urls);
    let out = cmd.output().expect("run curl");
    CurlRun {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
