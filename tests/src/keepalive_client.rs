//! A real NTLM client that logs in once and keeps its connection open for more requests: pyspnego
//! (the virtualenv of [`crate::epa_client::python`]) driven by `tests/clients/ntlm_keepalive_client.py`.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, ChildStdin, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::netns::NetNs;

/// One logged-in keep-alive connection.
pub struct KeepAliveLogin {
    child: Child,
    stdin: Option<ChildStdin>,
    responses: mpsc::Receiver<Value>,
}

impl KeepAliveLogin {
    /// Logs `user` in at `http://dst/path` from `source` in `ns`; returns the client and the response
    /// that ended the handshake.
    pub fn start(
        ns: &NetNs,
        source: IpAddr,
        dst: SocketAddr,
        path: &str,
        (user, password): (&str, &str),
    ) -> (KeepAliveLogin, Value) {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/ntlm_keepalive_client.py");
        let mut child = ns
            .command(crate::epa_client::python().to_str().expect("utf-8 path"))
            .arg(script)
            .args([&dst.ip().to_string(), &dst.port().to_string(), path])
            .args([user, password, "--source", &source.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the pyspnego keep-alive client");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, responses) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| serde_json::json!({ "error": format!("{e}: {line}") }));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        let client = KeepAliveLogin {
            stdin: child.stdin.take(),
            child,
            responses,
        };
        let first = client.next_response();
        (client, first)
    }

    /// Sends one more GET of `path` on the same connection and returns what came back.
    pub fn get(&mut self, path: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("the client is open");
        writeln!(stdin, "{path}")
            .and_then(|()| stdin.flush())
            .expect("talk to the client");
        self.next_response()
    }

    fn next_response(&self) -> Value {
        self.responses
            .recv_timeout(crate::wait::scaled(Duration::from_secs(30)))
            .unwrap_or_else(|_| serde_json::json!({ "error": "no response from the client" }))
    }

    /// Closes the connection (the client exits when its stdin closes).
    pub fn close(mut self) {
        self.stdin = None;
        let _ = self.child.wait();
    }
}

impl Drop for KeepAliveLogin {
    fn drop(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
