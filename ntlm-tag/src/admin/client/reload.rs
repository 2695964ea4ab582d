//! `ntlm-tag reload`: asks a running gateway to re-read its configuration file (`POST /reload` on
//! its admin endpoint) and waits for the outcome, so that `systemctl reload` (the unit's
//! `ExecReload`) fails with the gateway's reason when the file was refused. SIGHUP reloads too, but
//! its result is only logged.
#![forbid(unsafe_code)]

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};

use super::AdminClient;

/// How long to wait for the gateway's answer: a reload re-reads certificates and, with
/// `epa_bridging`, connects to the TLS backends. A little over the 30 s after which the admin
/// endpoint closes any connection, and well below systemd's 90 s for `ExecReload`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(35);

/// What the gateway did with the file.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// Applied to new connections; what it says it applied.
    Applied(String),
    /// Refused; the running configuration stays. Why.
    Refused(String),
}

/// Asks the gateway at `admin` to reload. An error means the gateway could not be asked or
/// did not answer (not running, wrong endpoint, no access, stopping).
pub fn request(admin: &str, token_file: Option<&Path>) -> Result<Reloaded> {
    let client = AdminClient::new(admin, token_file)?;
    let answer = client.request("POST", "/reload", ANSWER_TIMEOUT)?;
    let body = answer.body.trim().to_string();
    match answer.status {
        200 => Ok(Reloaded::Applied(body)),
        422 => Ok(Reloaded::Refused(body)),
        404 | 405 => bail!(
            "the gateway at {} answered {}: it predates `ntlm-tag reload`; send it SIGHUP \
             (its log says whether the reload was applied)",
            client.endpoint(),
            answer.status_line
        ),
        _ => bail!(
            "the gateway at {} answered {}: {body}",
            client.endpoint(),
            answer.status_line
        ),
    }
}
