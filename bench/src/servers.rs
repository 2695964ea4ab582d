//! The backend, the NTLM acceptors and the proxies under test: their configurations and how they
//! are started. Everything listens on 127.0.0.1; the proxies on core 0, the backend
//! and the acceptors on core 1 (see `setup::load_core` for the load generator).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{
    Args, Proxy,
    ntlm::Identity,
    procs::Server,
    setup::{BACKEND_CORE, PROXY_CORE},
};
use xtask::root;

const BACKEND_PORT: u16 = 28080;
const ACCEPTOR_HEADER_PORT: u16 = 28081;
const ACCEPTOR_CONNECTION_PORT: u16 = 28082;
const PROXY_PORT: u16 = 28090;
const ADMIN_PORT: u16 = 28091;

/// Simultaneous connections every proxy is configured to accept (above the idle run's 20,000).
const MAX_CONNECTIONS: usize = 50_000;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What the proxies forward to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// The fast HTTP backend (nginx returning a fixed 3-byte body).
    Http,
    /// The NTLM acceptor keyed by the `Jespa-Connection-Id` header.
    Ntlm,
}

impl Upstream {
    fn addr(self) -> SocketAddr {
        match self {
            Upstream::Http => local(BACKEND_PORT),
            Upstream::Ntlm => local(ACCEPTOR_HEADER_PORT),
        }
    }
}

/// Where the load goes: the proxy, or for `Direct` the backend itself (for NTLM, an acceptor
/// keyed by TCP connection, the way IIS is).
pub fn target(proxy: Proxy, upstream: Upstream) -> SocketAddr {
    match (proxy, upstream) {
        (Proxy::Direct, Upstream::Http) => local(BACKEND_PORT),
        (Proxy::Direct, Upstream::Ntlm) => local(ACCEPTOR_CONNECTION_PORT),
        _ => local(PROXY_PORT),
    }
}

/// The ports the bench listens on must be free (another bench, or a leftover process?).
pub fn check_ports_free() -> Result<()> {
    for port in [
        BACKEND_PORT,
        ACCEPTOR_HEADER_PORT,
        ACCEPTOR_CONNECTION_PORT,
        PROXY_PORT,
        ADMIN_PORT,
    ] {
        std::net::TcpListener::bind(local(port)).with_context(|| {
            format!("port 127.0.0.1:{port} is in use; is another bench running?")
        })?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// nginx's own settings shared by the backend and the proxies: one worker, no access log,
/// everything under `dir`, no per-connection request cap (HAProxy and ntlm-tag have none).
fn nginx_main(dir: &Path, server_blocks: &str) -> String {
    let d = dir.display();
    let nofile = super::setup::nofile();
    format!(
        "worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{server_blocks}
}}
"
    )
}

fn start_nginx(
    name: &str,
    core: usize,
    dir: &Path,
    config: &str,
    listen: SocketAddr,
) -> Result<Server> {
    let conf = write(dir, &format!("{name}.conf"), config)?;
    let args = vec![
        "-p".to_string(),
        dir.display().to_string(),
        "-e".to_string(),
        dir.join("error.log").display().to_string(),
        "-c".to_string(),
        conf.display().to_string(),
    ];
    let mut server = Server::spawn(
        name,
        core,
        Path::new("nginx"),
        &args,
        &dir.join(format!("{name}.log")),
    )?;
    server.wait_listening(listen)?;
    Ok(server)
}

/// The fast backend: nginx answering every request with a fixed `ok\n`, on the backend core.
pub fn start_backend(dir: &Path) -> Result<Server> {
    let dir = subdir(dir, "backend")?;
    let blocks = format!(
        "    server {{
        listen {} backlog=4096;
        location / {{ default_type text/plain; return 200 \"ok\\n\"; }}
    }}",
        local(BACKEND_PORT)
    );
    start_nginx(
        "backend",
        BACKEND_CORE,
        &dir,
        &nginx_main(&dir, &blocks),
        local(BACKEND_PORT),
    )
}

/// The NTLM acceptors on the backend core: one keyed by the connection-id header (behind the proxies), one
/// keyed by TCP connection (direct).
pub fn start_acceptors(dir: &Path, users: &[Identity]) -> Result<Vec<Server>> {
    let binary = root().join("target/release/ntlm-acceptor");
    [
        ("header", ACCEPTOR_HEADER_PORT),
        ("connection", ACCEPTOR_CONNECTION_PORT),
    ]
    .iter()
    .map(|(key, port)| {
        let mut args = strings(&["--listen", &local(*port).to_string(), "--key", key]);
        for u in users {
            args.push("--user".into());
            args.push(format!("{}:{}", u.user, u.password));
        }
        // One JSON line per request on stdout: to a file, not a pipe nobody reads.
        let mut server = Server::spawn(
            &format!("acceptor-{key}"),
            BACKEND_CORE,
            &binary,
            &args,
            &dir.join(format!("acceptor-{key}.log")),
        )?;
        server.wait_listening(local(*port))?;
        Ok(server)
    })
    .collect()
}

fn subdir(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(path)
}

/// Starts `proxy` in front of `upstream` on core 0 (nothing for `Direct`).
/// The gateway binary the bench measures: `--ntlm-tag`, or this tree's release build.
pub fn ntlm_tag_binary(args: &Args) -> PathBuf {
    args.ntlm_tag
        .clone()
        .unwrap_or_else(|| root().join("target/release/ntlm-tag"))
}

pub fn start_proxy(
    proxy: Proxy,
    upstream: Upstream,
    dir: &Path,
    args: &Args,
) -> Result<Option<Server>> {
    let dir = subdir(dir, proxy.key())?;
    let server = match proxy {
        Proxy::Direct => return Ok(None),
        Proxy::NginxCommon => start_nginx_proxy(&dir, upstream, false)?,
        Proxy::NginxTuned => start_nginx_proxy(&dir, upstream, true)?,
        Proxy::Haproxy => start_haproxy(&dir, upstream, HaproxyMode::Http)?,
        Proxy::HaproxyTcp => start_haproxy(&dir, upstream, HaproxyMode::Tcp)?,
        Proxy::NtlmTagEbpf | Proxy::NtlmTagNoEbpf | Proxy::NtlmTagXdp => {
            start_ntlm_tag(&dir, proxy, upstream, &ntlm_tag_binary(args))?
        }
    };
    Ok(Some(server))
}

/// The configuration everyone uses; tuned: 256 idle upstream connections instead of 16.
fn nginx_proxy_blocks(upstream: Upstream, tuned: bool) -> String {
    let keepalive = if tuned { 256 } else { 16 };
    format!(
        "    upstream backend {{
        server {upstream};
        keepalive {keepalive};
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Jespa-Connection-Id $remote_addr:$remote_port;
        }}
    }}",
        upstream = upstream.addr(),
        listen = local(PROXY_PORT),
    )
}

fn start_nginx_proxy(dir: &Path, upstream: Upstream, tuned: bool) -> Result<Server> {
    let name = if tuned { "nginx-tuned" } else { "nginx-common" };
    let config = nginx_main(dir, &nginx_proxy_blocks(upstream, tuned));
    start_nginx(name, PROXY_CORE, dir, &config, local(PROXY_PORT))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HaproxyMode {
    /// `mode http`, `http-reuse safe`, the connection-id header set like the common recipe.
    Http,
    /// `mode tcp`: every client connection relayed to a backend connection of its own, nothing
    /// parsed. For NTLM it relays to the acceptor keyed by TCP connection (no header to key by).
    Tcp,
}

/// HAProxy sizes its file-descriptor needs from `maxconn` (two per connection) and refuses to
/// start if it cannot raise RLIMIT_NOFILE that far; an idle client connection holds one.
fn haproxy_config(upstream: Upstream, mode: HaproxyMode) -> String {
    let nofile = super::setup::nofile();
    let maxconn = nofile.saturating_sub(200);
    if mode == HaproxyMode::Tcp {
        let upstream = match upstream {
            Upstream::Http => upstream.addr(),
            Upstream::Ntlm => local(ACCEPTOR_CONNECTION_PORT),
        };
        return format!(
            "global
    maxconn {maxconn}
    ulimit-n {nofile}
    no strict-limits
    nbthread 1

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend fe
    bind {listen}
    default_backend be

backend be
    server s1 {upstream}
",
            listen = local(PROXY_PORT),
        );
    }
    format!(
        "global
    maxconn {maxconn}
    ulimit-n {nofile}
    no strict-limits
    nbthread 1

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    timeout http-request 15s

frontend fe
    bind {listen}
    http-request set-header Jespa-Connection-Id %[src]:%[src_port]
    default_backend be

backend be
    http-reuse safe
    server s1 {upstream}
",
        listen = local(PROXY_PORT),
        upstream = upstream.addr(),
    )
}

fn start_haproxy(dir: &Path, upstream: Upstream, mode: HaproxyMode) -> Result<Server> {
    let conf = write(dir, "haproxy.cfg", &haproxy_config(upstream, mode))?;
    let args = strings(&["-db", "-f", &conf.display().to_string()]);
    let mut server = Server::spawn(
        "haproxy",
        PROXY_CORE,
        Path::new("haproxy"),
        &args,
        &dir.join("haproxy.log"),
    )?;
    server.wait_listening(local(PROXY_PORT))?;
    Ok(server)
}

fn ntlm_tag_config(proxy: Proxy, upstream: Upstream) -> String {
    let ebpf = if proxy == Proxy::NtlmTagNoEbpf {
        "off"
    } else {
        "required"
    };
    // A trusted balancer that sends nothing here: every real packet takes the pass-through path.
    let xdp = if proxy == Proxy::NtlmTagXdp {
        "xdp = [\"lo\"]\ntrusted_lbs = [\"198.18.1.100/32\"]\n"
    } else {
        ""
    };
    format!(
        "listen = [\"{listen}\"]
backends = [\"{upstream}\"]
ebpf = \"{ebpf}\"
{xdp}workers = 1
admin = \"{admin}\"
access_log = false

[limits]
max_connections = {MAX_CONNECTIONS}

[timeouts]
drain_secs = 1
",
        listen = local(PROXY_PORT),
        upstream = upstream.addr(),
        admin = local(ADMIN_PORT),
    )
}

fn start_ntlm_tag(dir: &Path, proxy: Proxy, upstream: Upstream, binary: &Path) -> Result<Server> {
    let conf = write(dir, "ntlm-tag.toml", &ntlm_tag_config(proxy, upstream))?;
    let args = strings(&["run", "--config", &conf.display().to_string()]);
    let mut server = Server::spawn(
        proxy.key(),
        PROXY_CORE,
        binary,
        &args,
        &dir.join("ntlm-tag.log"),
    )?;
    server.wait_listening(local(PROXY_PORT))?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_configs_differ_only_in_keepalive() {
        let common = nginx_proxy_blocks(Upstream::Http, false);
        let tuned = nginx_proxy_blocks(Upstream::Http, true);
        assert!(common.contains("keepalive 16;"));
        assert!(tuned.contains("keepalive 256;"));
        assert_eq!(
            common.replace("keepalive 16;", ""),
            tuned.replace("keepalive 256;", "")
        );
        assert!(common.contains("proxy_set_header Jespa-Connection-Id $remote_addr:$remote_port;"));
    }

    #[test]
    fn haproxy_tcp_relays_without_http() {
        let tcp = haproxy_config(Upstream::Ntlm, HaproxyMode::Tcp);
        assert!(tcp.contains("mode tcp") && !tcp.contains("mode http"));
        assert!(tcp.contains(&local(ACCEPTOR_CONNECTION_PORT).to_string()));
        let http = haproxy_config(Upstream::Http, HaproxyMode::Http);
        assert!(http.contains("http-reuse safe") && http.contains("nbthread 1"));
    }

    #[test]
    fn ntlm_tag_variants() {
        assert!(ntlm_tag_config(Proxy::NtlmTagNoEbpf, Upstream::Http).contains("ebpf = \"off\""));
        let xdp = ntlm_tag_config(Proxy::NtlmTagXdp, Upstream::Ntlm);
        assert!(xdp.contains("ebpf = \"required\"") && xdp.contains("xdp = [\"lo\"]"));
        assert!(xdp.contains(&local(ACCEPTOR_HEADER_PORT).to_string()));
    }
}
