//! One request to a running gateway's admin endpoint, as `ntlm-tag conns` and `ntlm-tag reload`
//! make it: a unix socket (root or the service user), or a TCP address with the bearer token from
//! `--token-file`. Blocking, one `Connection: close` request: these commands ask once and exit.
#![forbid(unsafe_code)]

pub mod conns;
pub mod reload;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::admin::{AdminEndpoint, AdminToken};

/// The gateway's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The first line, e.g. `HTTP/1.1 422 Unprocessable Entity`.
    pub status_line: String,
    pub body: String,
}

/// Where to ask: the endpoint, and the token a TCP endpoint needs.
pub struct AdminClient {
    endpoint: AdminEndpoint,
    token: Option<AdminToken>,
}

impl AdminClient {
    /// `admin` as `--admin` takes it; `token_file` as `--token-file`.
    pub fn new(admin: &str, token_file: Option<&Path>) -> Result<Self> {
        let endpoint: AdminEndpoint = admin.parse().map_err(anyhow::Error::msg)?;
        let token = token_file
            .map(AdminToken::from_file)
            .transpose()
            .context("--token-file")?;
        Ok(AdminClient { endpoint, token })
    }

    pub fn endpoint(&self) -> &AdminEndpoint {
        &self.endpoint
    }

    /// Sends `method path` and waits up to `timeout` for the whole answer.
    pub fn request(&self, method: &str, path: &str, timeout: Duration) -> Result<Answer> {
        let authorization = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\n{authorization}Content-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
        let response = match &self.endpoint {
            AdminEndpoint::Unix(socket) => {
                let stream = UnixStream::connect(socket).with_context(|| {
                    format!(
                        "cannot open the admin socket {} (is the gateway running with `admin = \
                         \"unix:{}\"`? it is readable by root and the service user only)",
                        socket.display(),
                        socket.display()
                    )
                })?;
                stream.set_read_timeout(Some(timeout))?;
                exchange(stream, &request)?
            }
            AdminEndpoint::Tcp(addr) => {
                let stream = TcpStream::connect_timeout(addr, Duration::from_secs(3))
                    .with_context(|| {
                        format!("cannot reach the admin endpoint at {addr} (is `admin` set?)")
                    })?;
                stream.set_read_timeout(Some(timeout))?;
                exchange(stream, &request)?
            }
        };
        let text = String::from_utf8_lossy(&response);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("malformed answer from {}", self.endpoint);
        };
        let status_line = head.lines().next().unwrap_or_default().to_string();
        let Some(status) = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
        else {
            bail!("malformed answer from {}: {status_line:?}", self.endpoint);
        };
        Ok(Answer {
            status,
            status_line,
            body: body.to_string(),
        })
    }
}

/// Sends `request` and reads the whole answer (the request asks the server to close).
fn exchange<S: Read + Write>(mut stream: S, request: &str) -> Result<Vec<u8>> {
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context("no complete answer from the admin endpoint in time")?;
    Ok(response)
}
