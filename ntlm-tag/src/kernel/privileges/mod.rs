//! Leaving root after start-up. The eBPF programs are attached and the ports bound by then; what the
//! gateway still does with the kernel is read (and, on reload, update) its maps through fds it holds.
//! It switches to an unprivileged user and keeps only the capability those map operations need on
//! this kernel ([`bpf_gate`]): CAP_BPF where unprivileged BPF is disabled on 5.8 to 5.18, nothing
//! anywhere else. Every other capability leaves the bounding set, the inheritable and ambient sets
//! are emptied and no_new_privs is set; the result is read back from /proc and the gateway refuses
//! to run if it is not exactly that.
//!
//! Capabilities, securebits and no_new_privs belong to a thread, not to the process: this must run
//! while the process has one thread (before the async runtime starts), so that every thread created
//! later inherits exactly what is left. The read-back checks every thread.

pub mod bpf_gate;
pub mod status;

use std::{ffi::CString, io};

use caps::{CapSet, CapsHashSet};
use thiserror::Error;

pub use bpf_gate::LookupNeeds;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error(
        "user = {0:?}: no such user (create it: `cargo xtask install` does, or `useradd --system \
         --no-create-home --shell /usr/sbin/nologin {0}`)"
    )]
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
    #[error("cannot change capabilities ({step}): {message} (root lacks CAP_SETPCAP?)")]
    Capabilities { step: &'static str, message: String },
    #[error("cannot read back what the process holds: {0}")]
    Status(#[from] status::StatusError),
    #[error(
        "after switching to {user:?} the process does not hold exactly what was intended; refusing to \
         run: {left}"
    )]
    NotAsIntended { user: String, left: String },
}

impl PrivilegeError {
    fn caps(step: &'static str) -> impl Fn(caps::errors::CapsError) -> PrivilegeError {
        move |e| PrivilegeError::Capabilities {
            step,
            message: e.to_string(),
        }
    }
}

/// Who the process runs as after [`drop_to`], and what it kept.
#[derive(Debug, Clone)]
pub struct Switched {
    pub uid: u32,
    pub gid: u32,
    pub needs: LookupNeeds,
}

impl Switched {
    /// `CAP_BPF`, or `none`.
    pub fn kept(&self) -> String {
        status::names(mask(&self.needs.keep))
    }
}

/// Switches the process to `user` (no supplementary groups). `lookup` tries a map lookup (true when
/// it works); without kernel maps (`None`) nothing is kept.
pub fn drop_to(user: &str, lookup: Option<&dyn Fn() -> bool>) -> Result<Switched, PrivilegeError> {
    let (uid, gid) = lookup_user(user)?;
    let needs = match lookup {
        Some(lookup) => bpf_gate::what_lookups_need(lookup)?,
        None => LookupNeeds {
            keep: CapsHashSet::new(),
            reason: "no kernel maps to read (eBPF off or unavailable)".to_string(),
        },
    };
    let keep = &needs.keep;

    // While still root (CAP_SETPCAP): nothing outside `keep` can ever come back.
    for cap in caps::runtime::thread_all_supported().difference(keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(PrivilegeError::caps("bounding set"))?;
    }
    // Keep the permitted set across setuid; the effective set is cleared by it regardless.
    caps::securebits::set_keepcaps(true).map_err(PrivilegeError::caps("PR_SET_KEEPCAPS"))?;
    switch_ids(user, uid, gid)?;
    caps::set(None, CapSet::Permitted, keep).map_err(PrivilegeError::caps("permitted set"))?;
    caps::set(None, CapSet::Effective, keep).map_err(PrivilegeError::caps("effective set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(PrivilegeError::caps("inheritable set"))?;
    caps::clear(None, CapSet::Ambient).map_err(PrivilegeError::caps("ambient set"))?;
    caps::securebits::set_keepcaps(false).map_err(PrivilegeError::caps("PR_SET_KEEPCAPS"))?;
    set_no_new_privs(user)?;

    let left = what_is_left(&status::all_threads()?, uid, gid, mask(keep));
    if !left.is_empty() {
        return Err(PrivilegeError::NotAsIntended {
            user: user.to_string(),
            left: left.join("; "),
        });
    }
    Ok(Switched { uid, gid, needs })
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// Every way the threads differ from: all ids `uid`/`gid`, exactly `keep` in the permitted,
/// effective and bounding sets, empty inheritable and ambient sets, no_new_privs on.
fn what_is_left(threads: &[status::ThreadStatus], uid: u32, gid: u32, keep: u64) -> Vec<String> {
    let mut left = Vec::new();
    for t in threads {
        let mut say = |what: String| left.push(format!("thread {}: {what}", t.tid));
        if t.uids.iter().any(|&u| u != uid) {
            say(format!("Uid {:?}, not {uid}", t.uids));
        }
        if t.gids.iter().any(|&g| g != gid) {
            say(format!("Gid {:?}, not {gid}", t.gids));
        }
        for (name, held) in [
            ("CapEff", t.cap_eff),
            ("CapPrm", t.cap_prm),
            ("CapBnd", t.cap_bnd),
            ("CapInh", t.cap_inh),
            ("CapAmb", t.cap_amb),
        ] {
            let intended = if matches!(name, "CapInh" | "CapAmb") {
                0
            } else {
                keep
            };
            if held != intended {
                say(format!(
                    "{name} holds {} (intended: {})",
                    status::names(held),
                    status::names(intended)
                ));
            }
        }
        if !t.no_new_privs {
            say("NoNewPrivs is 0".to_string());
        }
    }
    left
}

/// The numeric ids of a user.
pub fn lookup_user(user: &str) -> Result<(u32, u32), PrivilegeError> {
    let name = CString::new(user).map_err(|_| PrivilegeError::NoSuchUser(user.to_string()))?;
    // SAFETY: passwd is a plain C struct of integers and pointers; all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
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

/// setgroups, setgid, setuid: real, effective and saved ids all change, so root cannot be regained.
fn switch_ids(user: &str, uid: u32, gid: u32) -> Result<(), PrivilegeError> {
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
    }
    Ok(())
}

/// No exec can ever grant privileges again (setuid binaries, file capabilities); checked, not assumed.
fn set_no_new_privs(user: &str) -> Result<(), PrivilegeError> {
    let fail = |source| PrivilegeError::Switch {
        user: user.to_string(),
        step: "PR_SET_NO_NEW_PRIVS",
        source,
    };
    // SAFETY: prctl with integer arguments only.
    let (set, get) = unsafe {
        (
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        )
    };
    if set != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    if get != 1 {
        return Err(fail(io::Error::other(
            "PR_GET_NO_NEW_PRIVS does not report it set",
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caps::Capability;

    fn thread(uid: u32, eff: u64, bnd: u64, nnp: bool) -> status::ThreadStatus {
        status::ThreadStatus {
            tid: "7".to_string(),
            uids: vec![uid; 4],
            gids: vec![uid; 4],
            cap_inh: 0,
            cap_prm: eff,
            cap_eff: eff,
            cap_bnd: bnd,
            cap_amb: 0,
            no_new_privs: nnp,
        }
    }

    #[test]
    fn exactly_what_was_intended_leaves_nothing_to_report() {
        let bpf = Capability::CAP_BPF.bitmask();
        assert!(what_is_left(&[thread(65534, bpf, bpf, true)], 65534, 65534, bpf).is_empty());
        assert!(what_is_left(&[thread(65534, 0, 0, true)], 65534, 65534, 0).is_empty());
    }

    #[test]
    fn every_difference_is_named() {
        let bpf = Capability::CAP_BPF.bitmask();
        let admin = Capability::CAP_SYS_ADMIN.bitmask();
        let left = what_is_left(
            &[thread(0, bpf | admin, u64::MAX >> 23, false)],
            65534,
            65534,
            bpf,
        );
        let text = left.join("; ");
        assert!(text.contains("Uid [0, 0, 0, 0], not 65534"), "{text}");
        assert!(
            text.contains("CapEff holds CAP_SYS_ADMIN, CAP_BPF (intended: CAP_BPF)"),
            "{text}"
        );
        assert!(text.contains("CapPrm holds"), "{text}");
        assert!(text.contains("CapBnd holds"), "{text}");
        assert!(text.contains("NoNewPrivs is 0"), "{text}");
        // A second thread that was left out is named by its id.
        let mut other = thread(65534, 0, 0, true);
        other.tid = "8".to_string();
        other.cap_amb = admin;
        let left = what_is_left(&[thread(65534, 0, 0, true), other], 65534, 65534, 0);
        assert_eq!(
            left,
            vec!["thread 8: CapAmb holds CAP_SYS_ADMIN (intended: none)".to_string()]
        );
    }
}
