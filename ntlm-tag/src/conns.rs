//! `ntlm-tag conns`: the live connection table of a running gateway, read from its admin listener.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::registry::ConnectionRow;

pub fn print_table(admin: SocketAddr) -> Result<()> {
    let rows = fetch_rows(admin)?;
    println!(
        "{:<44} {:<24} {:<24} {:<9} {:<9} {:<22} {:<8} {:>8} {:>9}",
        "ID", "CLIENT", "PEER", "IDENTITY", "LEARNED", "BACKEND", "UPSTREAM", "REQUESTS", "AGE"
    );
    for r in &rows {
        println!(
            "{:<44} {:<24} {:<24} {:<9} {:<9} {:<22} {:<8} {:>8} {:>8.1}s",
            r.id,
            r.client,
            r.peer,
            r.identity_source,
            r.learned_from,
            r.backend,
            r.upstream,
            r.requests,
            r.age_ms as f64 / 1000.0
        );
    }
    println!("{} connection(s)", rows.len());
    Ok(())
}

fn fetch_rows(admin: SocketAddr) -> Result<Vec<ConnectionRow>> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the admin listener at {admin} (is `admin` set?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /connections HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed answer from {admin}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "admin listener answered: {}",
            head.lines().next().unwrap_or("")
        );
    }
    serde_json::from_str(body).context("cannot parse /connections")
}
