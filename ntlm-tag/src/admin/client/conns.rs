//! `ntlm-tag conns`: the live connection table of a running gateway, read from its admin endpoint
//! (its unix socket by default; a TCP address with the bearer token from `--token-file`).
#![forbid(unsafe_code)]

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};

use super::AdminClient;
use crate::registry::ConnectionRow;

pub fn print_table(admin: &str, token_file: Option<&Path>) -> Result<()> {
    let rows = fetch_rows(&AdminClient::new(admin, token_file)?)?;
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

fn fetch_rows(client: &AdminClient) -> Result<Vec<ConnectionRow>> {
    let answer = client.request("GET", "/connections", Duration::from_secs(10))?;
    if answer.status != 200 {
        bail!(
            "the admin endpoint answered {}: {}",
            answer.status_line,
            answer.body.trim()
        );
    }
    serde_json::from_str(&answer.body).context("cannot parse /connections")
}
