//! The proxy's own cgroup. The sock_ops program is attached to a cgroup and runs for every socket in it;
//! by moving the process into a child cgroup of its own before binding, the program sees exactly the
//! sockets this instance creates: other services, and other ntlm-tag instances, are never touched.
#![forbid(unsafe_code)]

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use thiserror::Error;

const PREFIX: &str = "ntlm-tag.";

/// Whether a cgroup's name is one this program makes: `ntlm-tag.<pid>`. Only the digits tell it
/// from the unit's own cgroup, `ntlm-tag.service`, which must never be left or removed.
fn is_own_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "cgroup v2 is not mounted in this mount namespace (no cgroup2 line in /proc/self/mountinfo); \
         mount it (`mount -t cgroup2 none /sys/fs/cgroup`), start ntlm-tag with `nsenter --net` rather than \
         `ip netns exec` (which hides /sys/fs/cgroup), or run with --ebpf off"
    )]
    NotMounted,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("this process is not in a cgroup v2 hierarchy (no `0::` line in /proc/self/cgroup)")]
    NoUnifiedCgroup,
    #[error(
        "cannot create cgroup {path}: {source} (needs root or write access to the parent cgroup)"
    )]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot move the process into cgroup {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A cgroup this process created and moved into; on drop it moves back and removes it.
#[derive(Debug)]
pub struct OwnCgroup {
    path: PathBuf,
    parent: PathBuf,
    dir: File,
}

impl OwnCgroup {
    /// Creates `<current cgroup>/ntlm-tag.<pid>` and moves the whole process into it, after removing
    /// empty ones that crashed instances left behind.
    pub fn create() -> Result<Self, CgroupError> {
        let mount = find_cgroup2_mount()?;
        let current = current_cgroup()?;
        let parent = parent_for_own(mount.join(current.trim_start_matches('/')));
        remove_stale(&parent);
        let path = parent.join(format!("{PREFIX}{}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path, source }),
        }
        let enter =
            |path: &Path| fs::write(path.join("cgroup.procs"), std::process::id().to_string());
        if let Err(source) = enter(&path) {
            let _ = fs::remove_dir(&path);
            return Err(CgroupError::Enter { path, source });
        }
        let dir = File::open(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(OwnCgroup { path, parent, dir })
    }

    /// Moves the whole process into `path`, a cgroup another ntlm-tag process created (an upgrade:
    /// the listening sockets handed over belong to it, and so do the connections accepted from
    /// them). Whichever of the two processes leaves last removes it.
    pub fn join(path: &Path) -> Result<Self, CgroupError> {
        let mount = find_cgroup2_mount()?;
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_own_name);
        let parent = match path.parent() {
            Some(parent) if ours && path.starts_with(&mount) => parent.to_path_buf(),
            _ => {
                return Err(CgroupError::Enter {
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "not an ntlm-tag cgroup under {} (the running gateway sent it)",
                            mount.display()
                        ),
                    ),
                });
            }
        };
        fs::write(path.join("cgroup.procs"), std::process::id().to_string()).map_err(|source| {
            CgroupError::Enter {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let dir = File::open(path).map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(OwnCgroup {
            path: path.to_path_buf(),
            parent,
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open cgroup directory, to attach programs to.
    pub fn file(&self) -> &File {
        &self.dir
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let procs = self.parent.join("cgroup.procs");
        if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
            tracing::warn!(cgroup = %self.path.display(), error = %e, "could not leave own cgroup; the next start removes it");
            return;
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            if e.raw_os_error() == Some(libc::EBUSY) {
                // An upgrade: the other process is still in it, and removes it when it leaves.
                tracing::debug!(cgroup = %self.path.display(), "own cgroup still holds the other process of an upgrade; it removes it");
                return;
            }
            tracing::warn!(cgroup = %self.path.display(), error = %e, "could not remove own cgroup; the next start removes it");
        }
    }
}

/// Where this process makes its cgroup, given the one it is in: inside it (under systemd, the
/// unit's delegated `ntlm-tag.service`), or beside it when it is already one of its own (a
/// re-exec).
fn parent_for_own(current: PathBuf) -> PathBuf {
    match current.file_name().and_then(|n| n.to_str()) {
        Some(name) if is_own_name(name) => {
            current.parent().map(Path::to_path_buf).unwrap_or(current)
        }
        _ => current,
    }
}

/// Removes `ntlm-tag.<pid>` cgroups under `parent` that no process is in any more (left by a crash).
///
/// A cgroup whose creator is still alive is never stale: another instance starting beside this one
/// creates its cgroup and only then moves into it, and removing it in between would make that
/// start fail.
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_own_name(name) || creator_is_alive(&name[PREFIX.len()..]) {
            continue;
        }
        let procs = fs::read_to_string(entry.path().join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() && fs::remove_dir(entry.path()).is_ok() {
            tracing::info!(cgroup = %entry.path().display(), "removed a cgroup left behind by an instance that did not exit cleanly");
        }
    }
}

/// Whether the process named by a cgroup's `<pid>` suffix still exists. A reused pid only keeps an
/// empty cgroup a little longer; an unparsable suffix is not ours to judge, so it counts as alive.
fn creator_is_alive(pid: &str) -> bool {
    match pid.parse::<u32>() {
        Ok(pid) => Path::new("/proc").join(pid.to_string()).exists(),
        Err(_) => true,
    }
}

/// The mount point of the cgroup v2 hierarchy in this mount namespace.
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NotMounted)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(unescape_octal))?
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d[0] <= b'3' && d.iter().all(|b| (b'0'..=b'7').contains(b))
        });
        match escaped {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn current_cgroup() -> Result<String, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or(CgroupError::NoUnifiedCgroup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_its_cgroup_inside_the_units_own_and_beside_one_of_its_own() {
        let unit = PathBuf::from("/sys/fs/cgroup/system.slice/ntlm-tag.service");
        assert_eq!(parent_for_own(unit.clone()), unit);
        assert_eq!(
            parent_for_own(unit.join("ntlm-tag.4242")),
            unit,
            "a re-exec makes a sibling"
        );
        assert!(is_own_name("ntlm-tag.17"));
        for other in ["ntlm-tag.service", "ntlm-tag.", "ntlm-tag.1x", "other.17"] {
            assert!(!is_own_name(other), "{other}");
        }
    }

    #[test]
    fn a_cgroup_whose_creator_lives_is_not_stale() {
        assert!(creator_is_alive(&std::process::id().to_string()));
        // Above the largest pid_max Linux allows (2^22): no such process.
        assert!(!creator_is_alive("4194305"));
        assert!(creator_is_alive("not-a-pid"));
    }

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let none = "22 1 0:21 / /proc rw - proc proc rw\n31 22 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(none), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let line = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(line),
            Some(PathBuf::from("/mnt/cg two"))
        );
    }
}
