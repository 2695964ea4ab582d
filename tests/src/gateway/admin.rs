//! A gateway's admin endpoint (unix socket or TCP inside its namespace), read as root.

use std::{net::SocketAddr, path::PathBuf};

use serde_json::Value;

/// Where a gateway's admin endpoint is, and how to read it.
#[derive(Debug, Clone)]
pub enum Admin {
    /// `--admin unix:PATH`: the harness's default (a socket in a directory of its own).
    Unix(PathBuf),
    /// `--admin HOST:PORT` given by the test, reached from inside the gateway's namespace.
    Tcp { addr: SocketAddr, ns_path: PathBuf },
}

/// An admin answer.
#[derive(Debug, Clone)]
pub struct AdminResponse {
    pub status: u16,
    /// The head, lowercased (for header checks).
    pub head: String,
    pub body: String,
}

impl Admin {
    /// The `--admin` argument.
    pub fn arg(&self) -> String {
        match self {
            Admin::Unix(path) => format!("unix:{}", path.display()),
            Admin::Tcp { addr, .. } => addr.to_string(),
        }
    }

    /// GET `path` with extra `headers`, as root.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> AdminResponse {
        match self {
            Admin::Unix(socket) => {
                let stream = std::os::unix::net::UnixStream::connect(socket)
                    .unwrap_or_else(|e| panic!("admin socket {}: {e}", socket.display()));
                raw_get(stream, path, headers)
            }
            Admin::Tcp { addr, ns_path } => {
                let (addr, path) = (*addr, path.to_string());
                let headers: Vec<(String, String)> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                crate::netns::run_in(ns_path, move || async move {
                    let stream = std::net::TcpStream::connect(addr).expect("admin TCP connect");
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    raw_get(stream, &path, &headers)
                })
            }
        }
    }

    /// GET `path`, which must answer 200, parsed as JSON.
    pub fn json(&self, path: &str) -> Value {
        let r = self.get(path, &[]);
        assert_eq!(r.status, 200, "admin {path}: {}", r.body);
        serde_json::from_str(&r.body).expect("admin JSON")
    }
}

/// One `Connection: close` request on a blocking stream; the admin answers with a Content-Length.
fn raw_get<S: std::io::Read + std::io::Write>(
    mut stream: S,
    path: &str,
    headers: &[(&str, &str)],
) -> AdminResponse {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("admin write");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("admin read");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("malformed admin answer: {text:?}"));
    AdminResponse {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// A directory of its own for a gateway's admin socket, removed on drop.
pub(super) struct AdminDir(pub(super) PathBuf);

impl AdminDir {
    /// `open_to_all`: the gateway runs as another user (a wrapper), who must create the socket.
    pub(super) fn new(open_to_all: bool) -> AdminDir {
        use std::os::unix::fs::PermissionsExt;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ntlm-tag-admin.{}.{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("admin socket directory");
        let mode = if open_to_all { 0o777 } else { 0o700 };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        AdminDir(dir)
    }
}

impl Drop for AdminDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
