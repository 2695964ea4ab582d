//! stdout protocol: one `ntlm-acceptor ready <addr>` line, then one JSON object per request.
//! Every line is flushed as it is written (tests read stdout through a pipe).

use std::io::Write;
use std::net::SocketAddr;

use serde::Serialize;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct RequestRecord<'a> {
    pub peer: SocketAddr,
    /// Serial number of the TCP connection (1, 2, ... in accept order).
    pub conn: u64,
    /// The connection-id header's value (lossy UTF-8), if the request had exactly one.
    pub conn_id: Option<&'a str>,
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// The Authorization scheme: `NTLM`, `Negotiate`, another scheme as sent, or null.
    pub authorization: Option<&'a str>,
    /// The NTLM message type of the token (1, 3), if it was a readable NTLM message.
    pub ntlm_message: Option<u32>,
    pub status: u16,
    /// The authenticated user the response was served as (200s only).
    pub user: Option<&'a str>,
    /// Request body bytes read (and discarded).
    pub body_len: u64,
    /// Why a token was refused (401/400/500 with a reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<&'a str>,
}

fn write_line(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the server down; the test reading it is gone anyway.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn ready(addr: SocketAddr) {
    write_line(&format!("ntlm-acceptor ready {addr}"));
}

pub fn request(record: &RequestRecord<'_>) {
    match serde_json::to_string(record) {
        Ok(line) => write_line(&line),
        Err(e) => eprintln!("ntlm-acceptor: cannot serialize request record: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_shape() -> Result<(), serde_json::Error> {
        let r = RequestRecord {
            peer: SocketAddr::from(([127, 0, 0, 1], 5000)),
            conn: 3,
            conn_id: None,
            method: "GET",
            path: "/x",
            authorization: Some("NTLM"),
            ntlm_message: Some(1),
            status: 401,
            user: None,
            body_len: 0,
            refused: None,
        };
        assert_eq!(
            serde_json::to_string(&r)?,
            r#"{"peer":"127.0.0.1:5000","conn":3,"conn_id":null,"method":"GET","path":"/x","authorization":"NTLM","ntlm_message":1,"status":401,"user":null,"body_len":0}"#
        );
        Ok(())
    }
}
