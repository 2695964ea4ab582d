//! Types shared by the kernel programs (`ntlm-tag-ebpf`) and the proxy (`ntlm-tag`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding, because the same bytes are written by
//! the kernel and read by userspace. When a layout changes, the map it lives in gets a new versioned name
//! so that an old program and a new loader never disagree silently.
#![no_std]

/// Name of the LRU hash map `socket cookie (u64) -> ConnIdentity`.
pub const CONN_IDENTITY_MAP: &str = "CONN_IDENTITY_V1";
/// Default number of entries of [`CONN_IDENTITY_MAP`]; userspace may resize it before loading.
pub const CONN_IDENTITY_DEFAULT_ENTRIES: u32 = 262_144;

/// Name of the per-CPU array of `u64` counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS_V1";
/// Number of slots in [`COUNTERS_MAP`]; room is left for counters added later.
pub const COUNTERS_SLOTS: u32 = 16;

/// Name of the sock_ops program that records and forgets connections.
pub const SOCK_OPS_PROGRAM: &str = "track_connections";

/// `AF_INET` and `AF_INET6`, as the kernel reports them in `bpf_sock_ops.family`.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Indices into [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A passive connection was established and its identity recorded.
    Recorded = 0,
    /// A recorded connection reached `TCP_CLOSE` and its record was deleted.
    Deleted = 1,
    /// Inserting a record failed (the map refused the update).
    InsertFailed = 2,
    /// State callbacks could not be enabled, so the record will only leave by LRU eviction.
    CallbacksUnavailable = 3,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::Recorded,
        Counter::Deleted,
        Counter::InsertFailed,
        Counter::CallbacksUnavailable,
    ];

    /// The name used in logs, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Recorded => "recorded",
            Counter::Deleted => "deleted",
            Counter::InsertFailed => "insert_failed",
            Counter::CallbacksUnavailable => "callbacks_unavailable",
        }
    }
}

/// How the original client of a connection was learned. Stored as a `u8` in [`ConnIdentity::source`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSource {
    /// The TCP peer itself is the client.
    Peer = 0,
    /// A PROXY protocol v1 header from a trusted balancer.
    ProxyV1 = 1,
    /// A PROXY protocol v2 header from a trusted balancer.
    ProxyV2 = 2,
    /// A TOA TCP option from a trusted balancer.
    Toa = 3,
    /// The inner header of an IPIP packet decapsulated from a trusted balancer.
    Ipip = 4,
}

impl ClientSource {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(ClientSource::Peer),
            1 => Some(ClientSource::ProxyV1),
            2 => Some(ClientSource::ProxyV2),
            3 => Some(ClientSource::Toa),
            4 => Some(ClientSource::Ipip),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ClientSource::Peer => "peer",
            ClientSource::ProxyV1 => "proxy-v1",
            ClientSource::ProxyV2 => "proxy-v2",
            ClientSource::Toa => "toa",
            ClientSource::Ipip => "ipip",
        }
    }
}

/// What the kernel knows about one accepted connection, keyed by socket cookie.
///
/// Addresses are 16 bytes in network order; IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`) so
/// that one layout serves both families. Ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnIdentity {
    /// The TCP peer as the socket sees it (the client, or the balancer in front of it).
    pub peer_addr: [u8; 16],
    /// The local address the connection was accepted on.
    pub local_addr: [u8; 16],
    /// The original client.
    pub client_addr: [u8; 16],
    /// The balancer that conveyed the client (all zero when `source` is `Peer`).
    pub balancer_addr: [u8; 16],
    /// `CLOCK_MONOTONIC` nanoseconds when the connection was established.
    pub established_ns: u64,
    pub peer_port: u16,
    pub local_port: u16,
    pub client_port: u16,
    /// Address family of the socket: [`AF_INET`] or [`AF_INET6`] (as a `u16` to keep the layout packed).
    pub family: u16,
    /// A [`ClientSource`] as `u8`.
    pub source: u8,
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<ConnIdentity>() == 88);
const _: () = assert!(core::mem::align_of::<ConnIdentity>() == 8);

impl ConnIdentity {
    pub const fn zeroed() -> Self {
        ConnIdentity {
            peer_addr: [0; 16],
            local_addr: [0; 16],
            client_addr: [0; 16],
            balancer_addr: [0; 16],
            established_ns: 0,
            peer_port: 0,
            local_port: 0,
            client_port: 0,
            family: 0,
            source: 0,
            _pad: [0; 7],
        }
    }
}

/// Writes an IPv4 address (network-order bytes) as a v4-mapped IPv6 address.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(feature = "user")]
// SAFETY: ConnIdentity is repr(C), Copy, has no padding holes left implicit and every bit pattern is valid.
unsafe impl aya::Pod for ConnIdentity {}
