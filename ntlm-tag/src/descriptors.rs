//! The process's descriptor limit (RLIMIT_NOFILE): every client connection holds one descriptor,
//! so start-up raises the soft limit to the hard one (as nginx's `worker_rlimit_nofile` and
//! HAProxy's computed `maxconn` do), and the accept loops name the limit when they hit it.
//!
//! Two libc calls, not a crate: the `rlimit` crate would wrap just these two.

use std::io;

/// The soft and hard limits now.
pub fn limits() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        Ok((limit.rlim_cur, limit.rlim_max))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The soft limit now (`None` if it cannot be read), for log lines.
pub fn soft_limit() -> Option<u64> {
    limits().ok().map(|(soft, _)| soft)
}

/// Raises the soft limit to the hard limit; returns the limit in force afterwards. Systemd starts
/// services with a soft limit of 1,024 and a hard limit of 524,288 unless `LimitNOFILE=` says
/// otherwise: without this, the gateway would stop accepting at about a thousand connections.
pub fn raise_to_hard_limit() -> io::Result<u64> {
    let (soft, hard) = limits()?;
    if soft >= hard {
        return Ok(soft);
    }
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the valid, initialised rlimit struct passed by pointer; raising the
    // soft limit up to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        Ok(hard)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_limit() {
        let raised = raise_to_hard_limit().expect("raise RLIMIT_NOFILE");
        let (soft, hard) = limits().expect("getrlimit");
        assert_eq!((raised, soft), (hard, hard));
    }
}
