//! A gateway described the way a scenario states it:
//! `Gateway::new().backend(&acceptor).mode(Mode::Pin).start(&topo.gateway)`.
//!
//! [`Gateway::new`] is the standard topology's gateway (listening on
//! [`Topology::gateway_addr`], in front of [`Topology::backend_addr`], with the kernel programs
//! required); [`Gateway::from_config`] starts from a configuration file alone. Each setter adds one
//! command-line flag; anything without a setter goes through [`arg`](GatewayBuilder::arg).

use std::{net::SocketAddr, path::Path};

use super::{Gateway, Started};
use crate::{
    acceptor::Acceptor,
    backends::{recording::Backend, scripted::ScriptedBackend, wire::WireBackend},
    netns::NetNs,
    topology::Topology,
};

/// `--mode`: how upstream connections are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bind,
    Tag,
    Pin,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Bind => "bind",
            Mode::Tag => "tag",
            Mode::Pin => "pin",
        }
    }
}

/// Something a gateway can forward to: an address, an `https://` URL, or a running test backend.
pub trait Upstream {
    /// The `--backend` value.
    fn upstream(&self) -> String;
}

impl Upstream for SocketAddr {
    fn upstream(&self) -> String {
        self.to_string()
    }
}

impl Upstream for str {
    fn upstream(&self) -> String {
        self.to_string()
    }
}

impl Upstream for String {
    fn upstream(&self) -> String {
        self.clone()
    }
}

impl<T: Upstream + ?Sized> Upstream for &T {
    fn upstream(&self) -> String {
        (**self).upstream()
    }
}

macro_rules! upstream_at_addr {
    ($($backend:ty),*) => {$(
        impl Upstream for $backend {
            fn upstream(&self) -> String {
                self.addr.to_string()
            }
        }
    )*};
}

upstream_at_addr!(Acceptor, Backend, WireBackend, ScriptedBackend);

/// The command line of a gateway to start; see the module documentation.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    /// `upgrade`, `check`, …: the word before the flags (none: `run`).
    subcommand: Option<&'static str>,
    config: Option<String>,
    listen: Vec<String>,
    backends: Vec<String>,
    /// Whether `listen`/`backends` still hold the defaults (the first setter call replaces them).
    default_listen: bool,
    default_backends: bool,
    ebpf: Option<&'static str>,
    args: Vec<String>,
    wrapper: Option<Vec<String>>,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// The standard topology's gateway: `--listen` [`Topology::gateway_addr`], `--backend`
    /// [`Topology::backend_addr`], `--ebpf required`.
    #[expect(
        clippy::new_ret_no_self,
        reason = "a builder: the scenario reads `Gateway::new()…start(ns)`"
    )]
    pub fn new() -> GatewayBuilder {
        GatewayBuilder {
            subcommand: None,
            config: None,
            listen: vec![Topology::gateway_addr().to_string()],
            backends: vec![Topology::backend_addr().to_string()],
            default_listen: true,
            default_backends: true,
            ebpf: Some("required"),
            args: Vec::new(),
            wrapper: None,
            env: Vec::new(),
        }
    }

    /// A gateway configured by the file at `path` alone (`--config PATH`); setters add flags,
    /// which override the file's keys.
    pub fn from_config(path: impl AsRef<Path>) -> GatewayBuilder {
        GatewayBuilder {
            listen: Vec::new(),
            backends: Vec::new(),
            default_listen: false,
            default_backends: false,
            ebpf: None,
            ..Gateway::new()
        }
        .config(path)
    }
}

impl GatewayBuilder {
    /// Runs `ntlm-tag SUBCOMMAND` (e.g. `upgrade`) with the same flags.
    pub fn subcommand(mut self, subcommand: &'static str) -> Self {
        self.subcommand = Some(subcommand);
        self
    }

    /// `--config PATH`, beside the flags (which override the file's keys).
    pub fn config(mut self, path: impl AsRef<Path>) -> Self {
        self.config = Some(path.as_ref().to_string_lossy().into_owned());
        self
    }

    /// `--listen ADDR`; the first call replaces the default listener, later ones add listeners.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        if std::mem::take(&mut self.default_listen) {
            self.listen.clear();
        }
        self.listen.push(addr.to_string());
        self
    }

    /// `--backend`; the first call replaces the default backend, later ones add backends.
    pub fn backend(mut self, upstream: impl Upstream) -> Self {
        if std::mem::take(&mut self.default_backends) {
            self.backends.clear();
        }
        self.backends.push(upstream.upstream());
        self
    }

    /// `--mode`.
    pub fn mode(self, mode: Mode) -> Self {
        self.args(&["--mode", mode.flag()])
    }

    /// `--ebpf required|auto|off`, replacing the default.
    pub fn ebpf(mut self, mode: &'static str) -> Self {
        self.ebpf = Some(mode);
        self
    }

    /// `--proxy-protocol` on the listeners, believing headers from the `trusted` prefixes.
    pub fn proxy_protocol(mut self, trusted: &[&str]) -> Self {
        self = self.arg("--proxy-protocol");
        for prefix in trusted {
            self = self.args(&["--trusted-lb", prefix]);
        }
        self
    }

    /// One more command-line word, as is.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// More command-line words, as they are.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Runs the binary through another program (e.g. `setpriv --reuid nobody …`).
    pub fn wrapper<S: AsRef<str>>(mut self, wrapper: &[S]) -> Self {
        self.wrapper = Some(wrapper.iter().map(|w| w.as_ref().to_string()).collect());
        self
    }

    /// An environment variable of the gateway's (e.g. `NOTIFY_SOCKET`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The command line, without the admin endpoint the harness adds.
    pub fn command_line(&self) -> Vec<String> {
        let mut line: Vec<String> = self.subcommand.iter().map(|s| s.to_string()).collect();
        if let Some(config) = &self.config {
            line.extend(["--config".to_string(), config.clone()]);
        }
        for listen in &self.listen {
            line.extend(["--listen".to_string(), listen.clone()]);
        }
        for backend in &self.backends {
            line.extend(["--backend".to_string(), backend.clone()]);
        }
        if let Some(ebpf) = self.ebpf {
            line.extend(["--ebpf".to_string(), ebpf.to_string()]);
        }
        line.extend(self.args.iter().cloned());
        line
    }

    /// Starts the gateway in `ns` and waits for its ready line; panics with its log if it exits.
    pub fn start(&self, ns: &NetNs) -> Gateway {
        self.try_start(ns).ready()
    }

    /// Like [`start`](Self::start), but reports an exit instead of panicking.
    pub fn try_start(&self, ns: &NetNs) -> Started {
        let line = self.command_line();
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let wrapper: Option<Vec<&str>> = self
            .wrapper
            .as_ref()
            .map(|w| w.iter().map(String::as_str).collect());
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Gateway::spawn(ns, &line, wrapper.as_deref(), &env)
    }
}
