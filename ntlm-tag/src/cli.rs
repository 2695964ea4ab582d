//! Command-line definition. Every setting here has a key of the same meaning in the TOML file; a flag
//! given on the command line overrides the file.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf};

/// The packaged admin endpoint, and where `ntlm-tag conns` looks by default.
pub const DEFAULT_ADMIN_SOCKET: &str = "unix:/run/ntlm-tag/admin.sock";

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::kernel::EbpfMode;

#[derive(Debug, Parser)]
#[command(
    name = "ntlm-tag",
    version,
    about = "NTLM/Negotiate gateway: stamps every upstream request with a never-reused id of the real client connection",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `run` is the default command: its flags may be given without naming it.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Run(RunArgs),
    /// Validate the configuration and print the effective settings; exit 64 naming the offending key.
    Check(RunArgs),
    /// Take over from the gateway running on `upgrade_socket` (as root): this new process gets its
    /// listeners and serves new connections, the old one serves its own until they close.
    Upgrade(UpgradeArgs),
    /// Print a manual page (roff): ntlm-tag(8) or ntlm-tag.toml(5); e.g. `ntlm-tag man | man -l -`.
    Man {
        #[arg(value_enum, default_value_t = ManPage::Command)]
        page: ManPage,
    },
    /// Print the completion script for a shell (the package installs them for bash, zsh and fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the live connection table of a running gateway (from its admin endpoint).
    Conns {
        /// The gateway's admin endpoint: `unix:/path` (run as root or the service user) or
        /// `HOST:PORT` (with --token-file).
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin: String,
        /// File with the admin bearer token (the gateway's admin_token_file), for a TCP endpoint.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Ask the running gateway to re-read its configuration file and wait for the result: exit 0
    /// when applied, 64 with the reason when refused (the running configuration stays), 1 when the
    /// gateway cannot be asked. The packaged unit's `ExecReload`.
    Reload {
        /// The gateway's admin endpoint: `unix:/path` (run as root or the service user) or
        /// `HOST:PORT` (with --token-file).
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin: String,
        /// File with the admin bearer token (the gateway's admin_token_file), for a TCP endpoint.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
}

/// `ntlm-tag upgrade`: the flags of `run`, and how long the new process may take to be ready.
#[derive(Debug, Clone, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Exit 75 when this process is not ready to take over within SECS seconds (a certificate or
    /// key that is a FIFO, a mount that does not answer): the running gateway keeps serving
    /// unchanged. Once ready, the hand-over completes. The packaged hand-over uses the default,
    /// which fits inside the unit's `TimeoutStartSec=`.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = crate::ready_deadline::DEFAULT_READY_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..=86400)
    )]
    pub ready_timeout: u64,
}

/// The manual pages `ntlm-tag man` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ManPage {
    /// ntlm-tag(8): the command, its subcommands, options, files, signals and exit status.
    Command,
    /// ntlm-tag.toml(5): every key of the configuration file.
    Config,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML configuration file; flags given here override its keys.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to accept clients on (repeatable). IPv6 `[::]:port` also accepts IPv4 clients.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Expect a PROXY protocol (v1 or v2) header on the --listen listeners.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// A balancer prefix (CIDR, repeatable) allowed to send PROXY headers; also trusted for TOA and
    /// IPIP when those are on and have no list of their own.
    #[arg(long = "trusted-lb", value_name = "CIDR")]
    pub trusted_lbs: Vec<ipnet::IpNet>,
    /// Turn TOA on: the TCP option kind that carries it (254 for LVS FULLNAT / DPVS; 200 is also
    /// used). Off unless given; 0 is off.
    #[arg(long, value_name = "KIND")]
    pub toa_kind: Option<u8>,
    /// A balancer prefix (CIDR, repeatable) whose TOA options are believed (instead of --trusted-lb).
    #[arg(long = "toa-trusted-lb", value_name = "CIDR")]
    pub toa_trusted_lbs: Vec<ipnet::IpNet>,
    /// Interface to decapsulate IPIP / IPv6-in-IPv6 from trusted balancers on, with XDP (repeatable);
    /// IPIP is off without one.
    #[arg(long = "xdp", value_name = "IFACE")]
    pub xdp_interfaces: Vec<String>,
    /// A balancer prefix (CIDR, repeatable) whose tunnels XDP decapsulates (instead of --trusted-lb).
    #[arg(long = "ipip-trusted-lb", value_name = "CIDR")]
    pub ipip_trusted_lbs: Vec<ipnet::IpNet>,
    /// `bind` (default, safe with every backend): shared pool for anonymous requests, an upstream
    /// connection that carried NTLM/Negotiate belongs to its client connection from then on; `tag`:
    /// shared pool for every request (only for backends keying NTLM on the id header, e.g. Jespa);
    /// `pin`: one upstream connection per client connection. Every request is stamped.
    #[arg(long, value_enum)]
    pub mode: Option<crate::upstream::Mode>,
    /// How new client connections are spread over backends.
    #[arg(long, value_enum)]
    pub balance: Option<crate::upstream::Balance>,
    /// Active health check: GET this path on every backend (expects 200; see the file for more).
    #[arg(long, value_name = "PATH")]
    pub health_check: Option<String>,
    /// TLS certificate chain (PEM) for the --listen listeners; repeat with --tls-key for SNI (the
    /// first pair is the default certificate).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Vec<std::path::PathBuf>,
    /// TLS private key (PEM), paired in order with --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Vec<std::path::PathBuf>,
    /// Switch to this user after the programs are attached and the ports bound.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Cap on shared (pooled) upstream connections per backend (limits.max_upstream_per_backend).
    #[arg(long, value_name = "N")]
    pub max_upstream_per_backend: Option<usize>,
    /// Accept HTTP/2 from clients (NTLM over HTTP/2 is refused with HTTP_1_1_REQUIRED).
    #[arg(long)]
    pub http2: bool,
    /// Backend `HOST:PORT` (plain HTTP) or `https://HOST[:PORT]` (TLS, verified against the
    /// system's roots; CA file, server name and client certificate in the file) (repeatable).
    #[arg(long = "backend", value_name = "HOST:PORT")]
    pub backends: Vec<String>,
    /// Name of the connection-id header stamped on every upstream request.
    #[arg(long, value_name = "NAME")]
    pub header: Option<String>,
    /// Connection-id template: {client}, {client_ip}, {client_port}, {uid}; behind PROXY v2,
    /// {aws_vpce_id}, {azure_link_id}, {tlv:0xNN} (`-` when the header had none).
    #[arg(long, value_name = "TEMPLATE")]
    pub id_template: Option<String>,
    /// Kernel identity tracking.
    #[arg(long, value_enum)]
    pub ebpf: Option<EbpfMode>,
    /// Admin endpoint (/healthz, /metrics, /connections, /kernel, POST /reload): `unix:/path`
    /// (private to root and the service user) or `HOST:PORT` (/connections, /kernel and /reload
    /// then need --admin-token-file).
    #[arg(long, value_name = "ENDPOINT")]
    pub admin: Option<String>,
    /// Bearer token file that opens /connections, /kernel and /reload on a TCP admin address (not
    /// readable by other users; at least 32 characters).
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Show full connection ids in logs and /connections, not only their keyed hashes. The id is
    /// what a header-keyed backend (Jespa) trusts: whoever reads it can act as that connection.
    #[arg(long)]
    pub show_full_ids: bool,
    /// Unix socket a successor (`ntlm-tag upgrade`) takes the listeners over through.
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,
    /// Entries of the kernel connection map (LRU).
    #[arg(long, value_name = "N")]
    pub map_entries: Option<u32>,
    /// Worker threads (0: one per CPU; 1: a single-threaded runtime, the cheapest per request).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}
