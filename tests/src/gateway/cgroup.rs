//! The cgroup a gateway makes for its programs (`ntlm-tag.<pid>`), and what a killed one leaves.

use std::path::PathBuf;

/// A gateway that was SIGKILLed.
pub struct Crashed {
    pub pid: u32,
}

impl Crashed {
    /// The cgroup the crashed gateway left, if it is still there.
    pub fn leftover_cgroup(&self) -> Option<PathBuf> {
        let mount = cgroup2_mount()?;
        walk_named(&mount, &format!("ntlm-tag.{}", self.pid))
            .into_iter()
            .next()
    }
}

impl Drop for Crashed {
    fn drop(&mut self) {
        remove_leftover_cgroup(self.pid);
    }
}

/// Removes `ntlm-tag.<pid>` if a killed gateway left it; returns whether it existed.
pub fn remove_leftover_cgroup(pid: u32) -> bool {
    let Some(mount) = cgroup2_mount() else {
        return false;
    };
    let mut found = false;
    for dir in walk_named(&mount, &format!("ntlm-tag.{pid}")) {
        found = true;
        let _ = std::fs::remove_dir(&dir);
    }
    found
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// This process's cgroup (v2) below the mount, e.g. `user.slice/…/session.scope` (empty at the root).
fn own_cgroup_path() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string()
}

/// This process's own cgroup directory: where the gateways and test programs it starts make theirs.
pub fn own_cgroup() -> Option<PathBuf> {
    Some(cgroup2_mount()?.join(own_cgroup_path()))
}

/// Directories named `name` below `root`, two levels deep at most below our own cgroup's parent.
pub fn walk_named(root: &std::path::Path, name: &str) -> Vec<PathBuf> {
    let base = root.join(own_cgroup_path());
    // Beside this process, or one level down (a test that starts its gateways in a cgroup of its own).
    let children = std::fs::read_dir(&base)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir());
    std::iter::once(base.clone())
        .chain(children)
        .map(|dir| dir.join(name))
        .filter(|candidate| candidate.is_dir())
        .collect()
}
