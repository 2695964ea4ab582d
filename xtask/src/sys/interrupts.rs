//! What must not outlive a task: process groups (vng → qemu), servers (the bench's proxies), test
//! harness processes (with their namespaces, gateways and cgroups) and temporary directories.
//! Each is tracked while it lives; on SIGINT/SIGTERM the handler [`install`]ed cleans up whatever
//! is still tracked, since drop guards do not run when a signal ends the process.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::{Mutex, Once, PoisonError, atomic::AtomicU64, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::process::{alive, signal};

#[derive(Clone, Debug)]
pub enum Live {
    /// A process group, led by this pid: killed as a whole.
    Group(u32),
    /// A server: asked to stop (SIGTERM), killed if still there [`GRACE`] later.
    Process(u32),
    /// A process running the test harness: its gateways, namespaces and test cgroups are removed,
    /// then it is killed (unless it is this process).
    Harness(u32),
    Dir(PathBuf),
}

/// How long an interrupted server has to stop after SIGTERM.
const GRACE: Duration = Duration::from_secs(3);

static LIVE: Mutex<Vec<(u64, Live)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

fn live() -> std::sync::MutexGuard<'static, Vec<(u64, Live)>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes its entry from the list when dropped (the owner cleaned up normally).
#[derive(Debug)]
pub struct Tracked(u64);

pub fn track(what: Live) -> Tracked {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    live().push((id, what));
    Tracked(id)
}

impl Drop for Tracked {
    fn drop(&mut self) {
        live().retain(|(id, _)| *id != self.0);
    }
}

/// Kills `pid`'s process group (SIGKILL), or `pid` alone if it leads none.
fn kill_tree(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Waits for `child`; after `timeout` cleans `live` up (kills the process group, or the test
/// binary with what it started) and returns `None`.
pub fn wait_or_kill(
    mut child: Child,
    timeout: Duration,
    live: &Live,
) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            eprintln!("timed out after {}s: killing it", timeout.as_secs());
            clean_up(live);
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Cleans one thing up now.
pub fn clean_up(what: &Live) {
    clean_up_all(std::slice::from_ref(what));
}

/// Processes first, newest first (servers get [`GRACE`] together), then directories.
fn clean_up_all(all: &[Live]) {
    let mut servers = Vec::new();
    for what in all {
        match what {
            Live::Group(pgid) => kill_tree(*pgid),
            Live::Harness(pid) => {
                ntlm_tag_tests::cleanup::remove_everything_of(*pid);
                if *pid != std::process::id() {
                    kill_tree(*pid);
                }
            }
            Live::Process(pid) => {
                signal(*pid, libc::SIGTERM);
                servers.push(*pid);
            }
            Live::Dir(_) => {}
        }
    }
    let deadline = Instant::now() + GRACE;
    while servers.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in servers.iter().filter(|p| alive(**p)) {
        signal(*pid, libc::SIGKILL);
    }
    for what in all {
        if let Live::Dir(path) = what {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// On SIGINT/SIGTERM: says `doing` (`stopping VMs and tests`), cleans up everything tracked, and
/// exits 130. Installed once per process; later calls do nothing.
pub fn install(doing: &'static str) -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .context("cannot install signal handlers")
        .map(|mut signals| {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    eprintln!("\ninterrupted: {doing}");
                    let all: Vec<Live> = live().iter().rev().map(|(_, x)| x.clone()).collect();
                    clean_up_all(&all);
                    std::process::exit(130);
                }
            });
        });
    });
    result
}

/// A directory removed on drop and on interrupt.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    _live: Tracked,
}

impl TempDir {
    /// `path`, emptied if it exists.
    pub fn at(path: &Path) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self::tracked(path.to_path_buf()))
    }

    /// A new directory `<prefix><random>` in the system's temporary directory.
    pub fn unique(prefix: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("cannot create a temporary directory")?;
        Ok(Self::tracked(dir.keep()))
    }

    fn tracked(path: PathBuf) -> Self {
        TempDir {
            _live: track(Live::Dir(path.clone())),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
