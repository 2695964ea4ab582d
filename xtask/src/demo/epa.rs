//! The demo's Extended Protection scene: a real NTLMv2 client that binds its login to the TLS
//! certificate it sees (pyspnego, `tls-server-end-point`) logs in through the gateway to an
//! IIS-like backend that requires the binding for *its own* certificate. Bridging (the gateway and
//! the backend present the same certificate, `epa_bridging = true` checks it) lets the login pass;
//! a backend with another certificate refuses it, and the gateway's log line says why.
//!
//! ```text
//!  lb ns                      gw ns                                          be ns
//!  198.18.1.101 (client) ──  :8445 TLS "site" cert, epa_bridging = true  ──  acceptor :8443 "site" cert
//!                            :8446 TLS "site" cert                       ──  acceptor :8444 its own cert
//! ```

use std::path::Path;

use anyhow::{Context, Result};
use ntlm_tag_tests::{
    acceptor::{Acceptor, Keying},
    epa_client,
    gateway::Gateway,
    netns::NetNs,
};

/// The site's name: the certificate's, the SNI and the SPN's host (`HTTP/mail.demo.test`).
const SITE: &str = "mail.demo.test";
const CLIENT: &str = "198.18.1.101";
const BACKEND: &str = "198.18.2.2";
const GATEWAY: &str = "198.18.1.1";

/// What the scene saw.
pub struct EpaScene {
    /// Status and user of the login through the bridging gateway.
    pub bridged: (u16, Option<String>),
    /// Status of the login through the gateway whose backend has another certificate.
    pub mismatched: u16,
    /// The gateway's explanation of that refusal: (cause, advice).
    pub diagnostic: Option<(String, String)>,
}

/// A CA and two certificates for the same name: the site's, and another.
struct Certificates {
    ca: String,
    site: (String, String),
    other: (String, String),
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

fn certificates(dir: &Path) -> Result<Certificates> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ntlm-tag demo CA");
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = params.self_signed(&ca_key)?;
    let issue = |file: &str| -> Result<(String, String)> {
        let mut params = rcgen::CertificateParams::new(vec![SITE.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, SITE);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok((
            write(dir, &format!("{file}.pem"), &cert.pem())?,
            write(dir, &format!("{file}.key"), &key.serialize_pem())?,
        ))
    };
    Ok(Certificates {
        ca: write(dir, "demo-ca.pem", &ca.pem())?,
        site: issue("site")?,
        other: issue("other")?,
    })
}

/// An IIS-like HTTPS backend that requires channel bindings for its own certificate.
fn epa_backend(
    be: &NetNs,
    port: u16,
    cert: &(String, String),
    users: &[(String, String)],
) -> Acceptor {
    Acceptor::start_with(
        be,
        format!("{BACKEND}:{port}").parse().expect("address"),
        users,
        Keying::Connection,
        &[
            "--tls-cert",
            &cert.0,
            "--tls-key",
            &cert.1,
            "--require-channel-binding",
        ],
    )
}

/// A gateway with a TLS listener presenting `listener` in front of one TLS backend.
fn gateway(
    gw: &NetNs,
    dir: &Path,
    name: &str,
    (port, backend_port): (u16, u16),
    listener: &(String, String),
    ca: &str,
    bridging: bool,
) -> Result<Gateway> {
    let config = write(
        dir,
        &format!("{name}.toml"),
        &format!(
            "listen = [{{ address = \"{GATEWAY}:{port}\", tls = [{{ cert = \"{cert}\", key = \"{key}\" }}] }}]\n\
             backends = [{{ address = \"https://{BACKEND}:{backend_port}\", tls_server_name = \"{SITE}\", ca_file = \"{ca}\" }}]\n\
             epa_bridging = {bridging}\n\
             ebpf = \"required\"\n",
            cert = listener.0,
            key = listener.1,
        ),
    )?;
    Ok(Gateway::start(gw, &["--config", &config]))
}

/// The `(cause, advice)` of the gateway's `Extended Protection:` warning.
fn diagnostic(gateway: &Gateway) -> Option<(String, String)> {
    let line = gateway
        .log()
        .into_iter()
        .find(|l| l.contains("Extended Protection:"))?;
    let advice = line
        .split_once("TLS channel: ")
        .map(|(_, rest)| rest.split(" backend=").next().unwrap_or(rest).to_string())
        .unwrap_or_default();
    let cause = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("cause="))
        .unwrap_or("?")
        .trim_matches('"')
        .to_string();
    Some((cause, advice))
}

/// Runs the scene: `(user, password)` logs in through both gateways from the balancer's namespace.
pub fn run(
    (lb, gw, be): (&NetNs, &NetNs, &NetNs),
    users: &[(String, String)],
    (user, password): (&str, &str),
) -> Result<EpaScene> {
    let dir = tempfile::tempdir()?;
    let certs = certificates(dir.path())?;
    let _bridged_backend = epa_backend(be, 8443, &certs.site, users);
    let _other_backend = epa_backend(be, 8444, &certs.other, users);
    let bridging = gateway(
        gw,
        dir.path(),
        "bridging",
        (8445, 8443),
        &certs.site,
        &certs.ca,
        true,
    )?;
    let offloading = gateway(
        gw,
        dir.path(),
        "other-cert",
        (8446, 8444),
        &certs.site,
        &certs.ca,
        false,
    )?;
    let login = |port: u16| {
        epa_client::login(
            lb,
            CLIENT.parse().expect("ip"),
            &format!("https://{GATEWAY}:{port}/owa/"),
            (user, password),
            &certs.ca,
            SITE,
        )
    };
    let bridged = login(8445);
    let bridged_user = bridged
        .body
        .lines()
        .find_map(|l| l.strip_prefix("user="))
        .map(str::to_string);
    let mismatched = login(8446);
    let diagnostic = (mismatched.status == 401)
        .then(|| {
            // The warning is written as the 401 goes back; give the log reader a moment.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                if let Some(d) = diagnostic(&offloading) {
                    return Some(d);
                }
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
        .flatten();
    drop(bridging);
    drop(offloading);
    Ok(EpaScene {
        bridged: (bridged.status, bridged_user),
        mismatched: mismatched.status,
        diagnostic,
    })
}

pub fn print(scene: &EpaScene, user: &str) {
    println!();
    println!(
        "{:<66} {:<7} RESULT",
        "EXTENDED PROTECTION (pyspnego NTLMv2 + channel binding)", "STATUS"
    );
    println!(
        "{:<66} {:<7} {}",
        format!("{user} via ntlm-tag, epa_bridging (same certificate on both legs)"),
        scene.bridged.0,
        match &scene.bridged.1 {
            Some(u) if scene.bridged.0 == 200 => format!("logged in as {u}"),
            _ => "NOT logged in".to_string(),
        }
    );
    println!(
        "{:<66} {:<7} {}",
        format!("{user} via ntlm-tag to a backend with another certificate"),
        scene.mismatched,
        match &scene.diagnostic {
            Some((cause, _)) => format!("refused; the gateway explains: cause={cause}"),
            None => "refused, unexplained".to_string(),
        }
    );
    if let Some((_, advice)) = &scene.diagnostic {
        println!("  gateway log: Extended Protection: {advice}");
    }
    println!();
}
