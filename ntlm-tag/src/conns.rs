//! `ntlm-tag conns`: the live connection table of a running gateway, read from its admin endpoint
//! (its unix socket by default; a TCP address with the bearer token from `--token-file`).
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    admin::{AdminEndpoint, AdminToken},
    registry::ConnectionRow,
};

pub fn print_table(admin: &str, token_file: Option<&Path>) -> Result<()> {
    let endpoint: AdminEndpoint = admin.parse().map_err(anyhow::Error::msg)?;
    let token = token_file
        .map(AdminToken::from_file)
        .transpose()
        .context("--token-file")?;
    let rows = fetch_rows(&endpoint, token.as_ref())?;
    let full_ids = rows.iter().any(|r| r.id.is_some());
    println!(
        "{:<12} {:<24} {:<24} {:<9} {:<9} {:<22} {:<8} {:>8} {:>9}  {:<13} {:<24}{}",
        "ID HASH",
        "CLIENT",
        "PEER",
        "IDENTITY",
        "LEARNED",
        "BACKEND",
        "UPSTREAM",
        "REQUESTS",
        "AGE",
        "AUTH",
        "USER",
        if full_ids { "  ID" } else { "" }
    );
    for r in &rows {
        println!(
            "{:<12} {:<24} {:<24} {:<9} {:<9} {:<22} {:<8} {:>8} {:>8.1}s  {:<13} {:<24}{}",
            r.id_hash,
            r.client,
            r.peer,
            r.identity_source,
            r.learned_from,
            r.backend,
            r.upstream,
            r.requests,
            r.age_ms as f64 / 1000.0,
            r.auth,
            r.user.as_deref().unwrap_or("-"),
            r.id.as_deref()
                .map(|id| format!("  {id}"))
                .unwrap_or_default()
        );
    }
    println!("{} connection(s)", rows.len());
    Ok(())
}

fn fetch_rows(endpoint: &AdminEndpoint, token: Option<&AdminToken>) -> Result<Vec<ConnectionRow>> {
    let authorization = token
        .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
        .unwrap_or_default();
    let request = format!(
        "GET /connections HTTP/1.1\r\nHost: admin\r\n{authorization}Connection: close\r\n\r\n"
    );
    let response = match endpoint {
        AdminEndpoint::Unix(path) => {
            let stream = UnixStream::connect(path).with_context(|| {
                format!(
                    "cannot open the admin socket {} (is the gateway running with `admin = \
                     \"unix:{}\"`? it is readable by root and the service user only)",
                    path.display(),
                    path.display()
                )
            })?;
            exchange(stream, &request)?
        }
        AdminEndpoint::Tcp(addr) => {
            let stream =
                TcpStream::connect_timeout(addr, Duration::from_secs(3)).with_context(|| {
                    format!("cannot reach the admin endpoint at {addr} (is `admin` set?)")
                })?;
            exchange(stream, &request)?
        }
    };
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed answer from {endpoint}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "the admin endpoint answered {}: {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        );
    }
    serde_json::from_str(body).context("cannot parse /connections")
}

/// Sends `request` and reads the whole answer (the request asks the server to close).
fn exchange<S: Read + Write + SetReadTimeout>(mut stream: S, request: &str) -> Result<Vec<u8>> {
    stream.set_timeout(Duration::from_secs(10))?;
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(response)
}

trait SetReadTimeout {
    fn set_timeout(&self, d: Duration) -> std::io::Result<()>;
}

impl SetReadTimeout for TcpStream {
    fn set_timeout(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

impl SetReadTimeout for UnixStream {
    fn set_timeout(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}
