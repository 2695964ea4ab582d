//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use http::HeaderName;

/// Where NTLM security contexts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyMode {
    /// Per value of the connection-id header (`--header`); requests of one client may arrive
    /// on any TCP connection. A request without the header gets 400.
    Header,
    /// Per TCP connection, like IIS; the header is ignored.
    Connection,
}

/// A real NTLM acceptor (HTTP/1.1 server) for ntlm-tag's tests and demo.
///
/// stdout: `ntlm-acceptor ready <addr>` once listening, then one JSON line per request.
#[derive(Debug, Parser)]
#[command(name = "ntlm-acceptor", version)]
pub struct Cli {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0: any free port; the ready line shows it).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,

    /// An account, NAME:PASSWORD (repeatable). Names are case-insensitive.
    #[arg(long = "user", value_name = "NAME:PASSWORD")]
    pub users: Vec<String>,

    /// A file of NAME:PASSWORD lines (`#` comments and blank lines are skipped).
    #[arg(long, value_name = "FILE")]
    pub users_file: Option<PathBuf>,

    /// Where security contexts live.
    #[arg(long, value_enum, default_value_t = KeyMode::Header)]
    pub key: KeyMode,

    /// The connection-id header (`--key header`; also logged and echoed in every mode).
    #[arg(long, value_name = "NAME", default_value = "Jespa-Connection-Id")]
    pub header: HeaderName,

    /// NetBIOS domain name announced in the challenge (the client's domain may be anything).
    #[arg(long, value_name = "NAME", default_value = "NTLMTAG")]
    pub domain: String,

    /// NetBIOS computer name announced in the challenge.
    #[arg(long, value_name = "NAME", default_value = "ACCEPTOR")]
    pub computer: String,

    /// Serve HTTPS with this PEM certificate chain (with `--tls-key`), like an IIS site with an
    /// https binding.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Extended Protection like IIS with `tokenChecking="Require"`: refuse every NTLMv2 login
    /// whose channel binding is not the `tls-server-end-point` of this server's certificate
    /// (`--tls-cert`, signed with SHA-256).
    #[arg(long, requires = "tls_cert")]
    pub require_channel_binding: bool,

    /// A virtual directory that is broken (its application pool stopped, say): requests under
    /// this path prefix, its `healthcheck.htm` included, get 503 (repeatable, case-insensitive).
    #[arg(long = "broken", value_name = "PREFIX")]
    pub broken: Vec<String>,

    /// `--key header`: how many header-keyed contexts to keep (oldest evicted first).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_contexts: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_flags() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from([
            "ntlm-acceptor",
            "--listen",
            "127.0.0.1:18999",
            "--user",
            "alice:Secret1",
            "--user",
            "bob:Secret2",
            "--key",
            "connection",
        ])?;
        assert_eq!(cli.users, ["alice:Secret1", "bob:Secret2"]);
        assert_eq!(cli.key, KeyMode::Connection);
        assert_eq!(cli.header.as_str(), "jespa-connection-id");
        let cli =
            Cli::try_parse_from(["ntlm-acceptor", "--listen", "[::1]:0", "--header", "X-Id"])?;
        assert_eq!(cli.key, KeyMode::Header);
        assert!(Cli::try_parse_from(["ntlm-acceptor"]).is_err());
        assert!(
            Cli::try_parse_from(["ntlm-acceptor", "--listen", "x", "--header", "a b"]).is_err()
        );
        Ok(())
    }
}
