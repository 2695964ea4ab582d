//! Dropping root after start-up: the eBPF programs are attached and the ports bound, so the gateway
//! needs neither root nor capabilities any more; map lookups go through the fds it already holds.

use std::{ffi::CString, io};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("no such user {0:?} (create it, e.g. `useradd --system ntlm-tag`)")]
    NoSuchUser(String),
    #[error("cannot look up user {user:?}: {source}")]
    Lookup {
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot switch to user {user:?} ({step}): {source}")]
    Switch {
        user: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "still holding capabilities after switching to {user:?} (CapEff {cap_eff}); refusing to run"
    )]
    CapabilitiesLeft { user: String, cap_eff: String },
}

/// The numeric ids of a user.
pub fn lookup_user(user: &str) -> Result<(u32, u32), PrivilegeError> {
    let name = CString::new(user).map_err(|_| PrivilegeError::NoSuchUser(user.to_string()))?;
    let mut pwd: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given; getpwnam_r writes only into pwd and buf.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(PrivilegeError::Lookup {
            user: user.to_string(),
            source: io::Error::from_raw_os_error(rc),
        });
    }
    if result.is_null() {
        return Err(PrivilegeError::NoSuchUser(user.to_string()));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is a plain C struct of integers and pointers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Switches the whole process (every thread: glibc broadcasts set*id) to `user`, with no
/// supplementary groups; the kernel clears all capabilities when a process leaves uid 0.
pub fn drop_to(user: &str) -> Result<(u32, u32), PrivilegeError> {
    let (uid, gid) = lookup_user(user)?;
    let fail = |step: &'static str| PrivilegeError::Switch {
        user: user.to_string(),
        step,
        source: io::Error::last_os_error(),
    };
    // SAFETY: plain syscalls with integer arguments (setgroups with a zero-length list).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setgid(gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setuid(uid) != 0 {
            return Err(fail("setuid"));
        }
        // Never regain privileges through exec of a setuid binary.
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_default();
    if !cap_eff.trim_start_matches('0').is_empty() {
        return Err(PrivilegeError::CapabilitiesLeft {
            user: user.to_string(),
            cap_eff,
        });
    }
    Ok((uid, gid))
}
