//! The TCP state of an accepted socket (`TCP_INFO`): tells a connection the client already reset
//! (its kernel record deleted at `TCP_CLOSE`) from one whose record is missing.

use std::{io, os::fd::AsRawFd};

/// `TCP_CLOSE` (include/net/tcp_states.h): the state after a reset.
const TCP_CLOSE: u8 = 7;

/// True when the connection is already closed (`TCP_CLOSE`): reset by the peer, typically before
/// the gateway accepted it. Nothing can be sent on it any more.
pub fn is_closed(socket: &impl AsRawFd) -> io::Result<bool> {
    // `struct tcp_info` begins with `__u8 tcpi_state`; the kernel copies at most `len` bytes, so
    // a short buffer is enough and independent of the struct's size on this kernel.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given, and the fd is open for the
    // duration of the borrow.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len < 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TCP_INFO returned no state",
        ));
    }
    Ok(info[0] == TCP_CLOSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_open_connection_is_not_closed_and_a_reset_one_is() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert!(!is_closed(&server).expect("tcp info"));
        // An abortive close sends RST.
        client.set_zero_linger().expect("SO_LINGER");
        drop(client);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !is_closed(&server).expect("tcp info") {
            assert!(
                std::time::Instant::now() < deadline,
                "the reset never arrived"
            );
            tokio::task::yield_now().await;
        }
    }
}
