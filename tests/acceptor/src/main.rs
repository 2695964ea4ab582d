//! `ntlm-acceptor`: a real NTLM acceptor (HTTP/1.1 server) used as ntlm-tag's test backend and
//! in its demo.
//!
//! It answers like IIS (`401` + `WWW-Authenticate: Negotiate` / `NTLM`, Type1 → Type2,
//! Type3 → `200` or `401`) and keeps the NTLM security context either per TCP connection
//! (`--key connection`, like IIS) or per value of the connection-id header (`--key header`, like
//! Jespa behind a pooling proxy).
//!
//! # Why not the `sspi` crate
//!
//! The brief preferred `sspi` (Devolutions) as the acceptor. A spike against sspi 0.23.1 with a
//! real `curl --ntlm` client showed it unusable here:
//!
//! * its server rejects curl's Type1 outright ("Negotiate flags do not contain the necessary
//!   flags": it requires NEGOTIATE_UNICODE, curl sends OEM only);
//! * with that flag patched in, it **accepted every password and every user name**: the
//!   server-side `complete_authenticate` never compares the client's NTProofStr, it relies on
//!   the MIC alone, and curl (like most non-Windows clients) sends no MIC;
//! * its multi-user support (`custom_set_auth_identities`) tries candidates by that same MIC
//!   check, so it cannot tell users apart either.
//!
//! So the NTLMv2 check is implemented here (module [`ntlm`]) from MS-NLMP with RustCrypto
//! primitives (`md4`, `md-5`, `hmac`), `getrandom` for server challenges and `base64`:
//! NTOWFv2 = HMAC_MD5(MD4(UTF16LE(password)), UTF16LE(UPPER(user) + domain)),
//! NTProofStr = HMAC_MD5(NTOWFv2, ServerChallenge || blob), compared in constant time with the
//! first 16 bytes of the client's NTLMv2 response. NTLMv1/LM responses are refused; the MIC,
//! when a client sends one, is not checked (no session security is offered).

mod acceptor;
mod authz;
mod cli;
mod log;
mod service;
mod store;
mod tls;
mod users;
mod workloads;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

// The NTLM messages and crypto are the crate's library, shared with the bench's NTLM client.
use ntlm_tag_test_acceptor::ntlm;

use crate::acceptor::Acceptor;
use crate::cli::Cli;
use crate::ntlm::ServerNames;
use crate::service::App;
use crate::store::ContextStore;
use crate::users::UserStore;

fn load_users(cli: &Cli) -> anyhow::Result<UserStore> {
    let mut users = UserStore::default();
    for entry in &cli.users {
        users.add_entry(entry, "--user")?;
    }
    if let Some(path) = &cli.users_file {
        users.add_file(path)?;
    }
    if users.is_empty() {
        eprintln!("ntlm-acceptor: warning: no users configured; every authentication will fail");
    } else {
        eprintln!("ntlm-acceptor: {} user(s) configured", users.len());
    }
    Ok(users)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ntlm-acceptor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM or SIGINT.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let users = load_users(&cli)?;
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(tls::load(cert, key)?),
        _ => None,
    };
    let mut acceptor = Acceptor::new(users, ServerNames::new(&cli.domain, &cli.computer));
    if cli.require_channel_binding
        && let Some(tls) = &tls
    {
        acceptor = acceptor
            .require_channel_binding(ntlm::binding::expected_for_certificate(tls.leaf.as_ref()));
    }
    let app = Arc::new(App {
        acceptor,
        key: cli.key,
        header: cli.header.clone(),
        contexts: ContextStore::new(cli.max_contexts),
        broken: cli.broken.clone(),
    });

    // Handlers first, so a SIGTERM sent right after the ready line is not fatal-by-default.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    log::ready(addr);

    let mut serial = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    serial += 1;
                    let _ = stream.set_nodelay(true);
                    let app = Arc::clone(&app);
                    match &tls {
                        None => {
                            tokio::spawn(service::serve_connection(app, stream, peer, serial));
                        }
                        Some(tls) => {
                            let acceptor = tls.acceptor.clone();
                            tokio::spawn(async move {
                                match acceptor.accept(stream).await {
                                    Ok(stream) => service::serve_connection(app, stream, peer, serial).await,
                                    Err(e) => eprintln!("ntlm-acceptor: conn {serial} from {peer}: TLS handshake: {e}"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // E.g. EMFILE under a connection flood: back off instead of spinning.
                    eprintln!("ntlm-acceptor: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Returning drops the runtime, which cancels the connection tasks.
    Ok(())
}
