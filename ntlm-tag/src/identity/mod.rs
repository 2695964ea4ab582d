//! Who is behind a client connection: the kernel's record for its socket cookie, or, without one, the
//! peer address the accept returned, or a PROXY header from a trusted balancer; and the id the
//! connection is stamped with. The proxy asks this module once per connection
//! ([`Identifier::accept`]); it never touches the kernel itself.
#![forbid(unsafe_code)]

pub mod addr_text;
pub mod conn_id;
pub mod id_hash;
mod identifier;
pub mod proxy_header;
mod settings;
pub mod trust;

use std::net::{IpAddr, SocketAddr};

use ntlm_tag_common::ClientSource;

use crate::kernel::KernelRecord;
pub use addr_text::AddrText;
pub use conn_id::{IdTemplate, UidGenerator, canonical};
pub use id_hash::{ConnName, IdDisplay, IdHash};
pub use identifier::{Identified, Identifier, Identifying, ProxyProtocol};
pub use settings::{DEFAULT_HEADER, IdentityConfig};

/// Where the identity of a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// The kernel recorded this socket when its handshake completed.
    Kernel,
    /// No kernel record (eBPF off or unavailable, or the record is missing): the accepted peer address.
    Fallback,
}

impl IdentitySource {
    pub fn name(self) -> &'static str {
        match self {
            IdentitySource::Kernel => "kernel",
            IdentitySource::Fallback => "fallback",
        }
    }
}

/// The identity of one client connection.
#[derive(Debug, Clone)]
pub struct ConnectionIdentity {
    /// The original client.
    pub client: SocketAddr,
    /// The TCP peer the gateway's socket sees.
    pub peer: SocketAddr,
    /// The local address the connection was accepted on.
    pub local: SocketAddr,
    /// How the client was learned (the peer itself, a PROXY header, TOA, IPIP).
    pub learned_from: ClientSource,
    /// The balancer that conveyed the client, if any.
    pub balancer: Option<IpAddr>,
    pub source: IdentitySource,
    /// The socket cookie, when the kernel tracks connections (eBPF on) and provided one.
    pub cookie: Option<u64>,
    /// TLVs of a PROXY v2 header, when one named the client. Boxed: most connections have none,
    /// and the identity lives in the connection table for the connection's whole life.
    pub proxy_tlvs: Option<Box<proxy_header::ProxyTlvs>>,
}

impl ConnectionIdentity {
    fn from_peer(peer: SocketAddr, local: SocketAddr, cookie: Option<u64>) -> Self {
        ConnectionIdentity {
            client: canonical(peer),
            peer: canonical(peer),
            local: canonical(local),
            learned_from: ClientSource::Peer,
            balancer: None,
            source: IdentitySource::Fallback,
            cookie,
            proxy_tlvs: None,
        }
    }

    fn from_record(record: KernelRecord, cookie: u64) -> Self {
        ConnectionIdentity {
            client: canonical(record.client),
            peer: canonical(record.peer),
            local: canonical(record.local),
            learned_from: record.learned_from,
            balancer: record.balancer,
            source: IdentitySource::Kernel,
            cookie: Some(cookie),
            proxy_tlvs: None,
        }
    }

    /// Takes the client from a PROXY header a trusted balancer sent. LOCAL/UNKNOWN headers (the
    /// balancer's own connections, e.g. health checks) leave the identity as it is.
    pub fn apply_proxy_header(&mut self, header: &proxy_header::ProxyHeader) {
        let Some(source) = header.source else {
            return;
        };
        self.balancer = Some(self.peer.ip());
        self.client = canonical(source);
        self.learned_from = match header.version {
            proxy_header::ProxyVersion::V1 => ClientSource::ProxyV1,
            proxy_header::ProxyVersion::V2 => ClientSource::ProxyV2,
        };
        if header.version == proxy_header::ProxyVersion::V2 {
            self.proxy_tlvs = Some(Box::new(header.tlvs.clone()));
        }
    }

    /// A label for metrics: where the identity came from.
    pub fn metrics_label(&self) -> crate::metrics::ConnectionSource {
        use crate::metrics::ConnectionSource as S;
        match (self.learned_from, self.source) {
            (ClientSource::ProxyV1, _) => S::ProxyV1,
            (ClientSource::ProxyV2, _) => S::ProxyV2,
            (_, IdentitySource::Fallback) => S::Fallback,
            (ClientSource::Toa, _) => S::KernelToa,
            (ClientSource::Ipip, _) => S::KernelIpip,
            (ClientSource::Peer, IdentitySource::Kernel) => S::KernelPeer,
        }
    }
}
