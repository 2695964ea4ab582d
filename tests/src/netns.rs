//! Network namespaces that always go away: created on construction, deleted on drop (pass or fail).

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output if it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace named `nt<pid>-<n>-<role>`, removed on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(role: &str) -> Self {
        assert!(
            nix_is_root(),
            "integration tests create network namespaces and load eBPF: run them as root (cargo xtask test)"
        );
        let name = format!(
            "nt{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// Runs a command inside the namespace (`nsenter --net`, which keeps /sys/fs/cgroup and bpffs visible,
    /// unlike `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a new thread that has entered this namespace, with its own current-thread runtime.
    /// Sockets created there belong to the namespace.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        run_in(&self.path(), f)
    }

    /// Spawns a thread in the namespace running `f` until it returns; returns its join handle.
    pub fn spawn<F, Fut, T>(&self, f: F) -> std::thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        spawn_in(self.path(), f)
    }
}

/// Runs `f` on a new thread inside the namespace at `path` (see [`NetNs::run`]).
pub fn run_in<F, Fut, T>(path: &std::path::Path, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    spawn_in(path.to_path_buf(), f)
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A thread that enters the namespace at `path` and runs `f` on a current-thread runtime of its
/// own (a namespace belongs to a thread, so the runtime must not move work elsewhere).
fn spawn_in<F, Fut, T>(path: PathBuf, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        enter(&path);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f())
    })
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &std::path::Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd affects only the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects `a` and `b` with a veth pair named `a_if`/`b_if` (created directly inside the namespaces,
/// so names only need to be unique there) and brings both ends up.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    sh(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    );
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Adds an address (IPv6 without duplicate address detection, so it is usable at once).
pub fn addr(ns: &NetNs, dev: &str, cidr: &str) {
    if cidr.contains(':') {
        ns.ip(&["addr", "add", cidr, "dev", dev, "nodad"]);
    } else {
        ns.ip(&["addr", "add", cidr, "dev", dev]);
    }
}
