//! A real NTLM client that sends Extended Protection channel bindings: pyspnego (in the virtualenv
//! `cargo xtask setup` makes at `target/pyspnego-venv`) driven by `tests/clients/epa_ntlm_client.py`
//! over one keep-alive HTTPS connection.

use std::{net::IpAddr, path::PathBuf};

use serde_json::Value;

use crate::netns::NetNs;

/// The virtualenv's interpreter: `$NTLM_TAG_PYSPNEGO_PYTHON`, or `target/pyspnego-venv`.
pub fn python() -> PathBuf {
    let path = std::env::var_os("NTLM_TAG_PYSPNEGO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyspnego-venv/bin/python")
        });
    assert!(
        path.is_file(),
        "{} not found: `cargo xtask setup` installs pyspnego into it",
        path.display()
    );
    path
}

/// What the client saw at the end of the handshake.
#[derive(Debug)]
pub struct EpaRun {
    /// The final status (200 when the login passed).
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

/// Logs `user` in at `url` (https) from `source` in `ns`, trusting `ca_file` and checking the
/// certificate for `server_name` (also the SPN's host: `HTTP/<server_name>`).
pub fn login(
    ns: &NetNs,
    source: IpAddr,
    url: &str,
    (user, password): (&str, &str),
    ca_file: &str,
    server_name: &str,
) -> EpaRun {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/epa_ntlm_client.py");
    let out = ns
        .command(python().to_str().expect("utf-8 path"))
        .arg(script)
        .args([url, user, password, "--ca-file", ca_file])
        .args([
            "--server-name",
            server_name,
            "--source",
            &source.to_string(),
        ])
        .output()
        .expect("run the pyspnego client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let result: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("the pyspnego client printed no result ({e}): {stdout}\n{stderr}")
    });
    EpaRun {
        status: result["status"].as_u64().unwrap_or(0) as u16,
        body: result["body"].as_str().unwrap_or_default().to_string(),
        stderr,
    }
}
