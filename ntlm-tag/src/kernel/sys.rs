//! The raw syscalls outside aya, each in one small function with a note on why it is sound: the
//! socket cookie that keys the kernel's records, the TCP state of an accepted socket (`TCP_INFO`),
//! the memlock limit, the monotonic clock the kernel stamps records with, and the effective uid.
//! (The user switch's own syscalls live in `privileges`.)

use std::{io, os::fd::AsRawFd};

/// `SO_COOKIE` from `<asm-generic/socket.h>` (Linux 4.12+).
const SO_COOKIE: libc::c_int = 57;

/// Reads the kernel's unique cookie of `socket`.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and the fd is open for the
    // duration of the borrow.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lifts the locked-memory limit that kernels before 5.11 charge BPF maps against.
pub fn raise_memlock_limit() -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: passes a valid, initialised rlimit by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// True when the process runs as root (effective uid 0).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True when `name` is a network interface in this process's network namespace. Asks the kernel
/// (`if_nametoindex`) rather than reading /sys/class/net, which shows the namespace /sys was mounted
/// in: under `nsenter --net` that is the host's, not the gateway's.
pub fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the function only
    // reads it and returns 0 when there is no such interface.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

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
