//! Client addresses as text for the values every new connection renders (its id, the forwarding
//! headers). IPv4 addresses and ports are written digit by digit: `Display` for an address goes
//! through the formatting machinery (it honours width and padding), several hundred instructions
//! a call. IPv6 addresses keep `Display` (its zero compression and scope ids are not worth
//! copying); the text is the same either way.
#![forbid(unsafe_code)]

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

/// Longest text of a socket address: `[` an IPv6 address with an embedded IPv4 one (45) `%` a
/// scope id (10) `]:` a port (5).
const MAX: usize = 64;

/// An address as text, on the stack.
pub struct AddrText {
    buf: [u8; MAX],
    len: usize,
}

impl AddrText {
    /// `ip` as `Display` shows it.
    pub fn ip(ip: IpAddr) -> Self {
        let mut text = AddrText::empty();
        match ip {
            IpAddr::V4(v4) => text.push_ipv4(v4),
            IpAddr::V6(v6) => text.display(&v6),
        }
        text
    }

    /// `addr` as `Display` shows it: `ip:port`, `[ip]:port` for IPv6.
    pub fn socket(addr: SocketAddr) -> Self {
        let mut text = AddrText::empty();
        match addr {
            SocketAddr::V4(v4) => {
                text.push_ipv4(*v4.ip());
                text.push(b":");
                text.push_decimal(u32::from(v4.port()));
            }
            SocketAddr::V6(v6) => text.display(&v6),
        }
        text
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }

    fn empty() -> Self {
        AddrText {
            buf: [0; MAX],
            len: 0,
        }
    }

    fn push_ipv4(&mut self, ip: Ipv4Addr) {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b".");
            }
            self.push_decimal(u32::from(octet));
        }
    }

    fn push_decimal(&mut self, n: u32) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    fn display(&mut self, value: &dyn fmt::Display) {
        // The buffer holds the longest address; a longer text could only be cut short.
        let _ = write!(self, "{value}");
    }

    fn push(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(MAX);
        self.buf[self.len..end].copy_from_slice(&bytes[..end - self.len]);
        self.len = end;
    }
}

impl fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > MAX {
            return Err(fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

impl fmt::Display for AddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text is exactly what `Display` gives, for the addresses a connection can have.
    #[test]
    fn addresses_read_as_display_shows_them() {
        let sockets = [
            "0.0.0.0:0",
            "198.18.0.7:40001",
            "255.255.255.255:65535",
            "10.0.0.5:80",
            "[fd00:5418::2]:443",
            "[::ffff:198.18.0.7]:1",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[::]:0",
        ];
        let scoped =
            std::net::SocketAddrV6::new("fe80::1".parse().expect("ip"), 65535, 0, u32::MAX);
        let parsed = sockets.map(|text| text.parse::<SocketAddr>().expect("address"));
        for addr in parsed.into_iter().chain([SocketAddr::V6(scoped)]) {
            assert_eq!(AddrText::socket(addr).as_str(), addr.to_string());
            assert_eq!(AddrText::ip(addr.ip()).as_str(), addr.ip().to_string());
        }
        for octets in [[1, 2, 3, 4], [100, 20, 9, 0], [0, 10, 200, 255]] {
            let ip = IpAddr::from(octets);
            assert_eq!(AddrText::ip(ip).as_str(), ip.to_string());
        }
    }
}
