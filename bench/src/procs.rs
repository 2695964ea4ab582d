//! The processes under test: started pinned to a core, sampled from `/proc`, stopped on drop, and
//! stopped too when the bench is interrupted (tracked by `xtask::sys::interrupts`).

use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use xtask::sys::{
    interrupts::{self, Live, Tracked},
    process,
};

/// The fields of `/proc/PID/stat` after the command name: state is [0], ppid [1], utime [11],
/// stime [12].
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A server process pinned to one core, stopped when dropped.
pub struct Server {
    pub name: String,
    child: Child,
    log: PathBuf,
    /// The process and its children (nginx's workers), found once it is ready.
    pids: Vec<u32>,
    _interrupted: Tracked,
}

impl Server {
    /// Starts `program args` under `taskset -c core`, output to `log`.
    pub fn spawn(
        name: &str,
        core: usize,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Server> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(core.to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        Ok(Server {
            name: name.to_string(),
            pids: vec![child.id()],
            _interrupted: interrupts::track(Live::Process(child.id())),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections, then records the process tree.
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within 20 s:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // nginx forks its worker right after binding; give it a moment to appear.
        std::thread::sleep(Duration::from_millis(300));
        self.pids = process_tree(self.child.id());
        Ok(())
    }

    /// utime + stime of the process tree, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.pids.iter().map(|p| cpu_ticks(*p)).sum()
    }

    /// Resident memory of the process tree, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids.iter().map(|p| rss_kib(*p)).sum()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self) {
        process::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within 5 s: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `pid` and its descendants.
fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| Some((p, parent_of(p)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).get(1)?.parse().ok()
}

fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let fields = stat_fields(&stat);
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Clock ticks per second of utime/stime.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_skip_a_command_with_spaces_and_parens() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0";
        let f = stat_fields(stat);
        assert_eq!(f[0], "S");
        assert_eq!(f[1], "1");
        assert_eq!(f[11], "7");
        assert_eq!(f[12], "3");
    }

    #[test]
    fn this_process_is_sampled() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        assert_eq!(process_tree(me)[0], me);
        assert!(process::alive(me));
    }
}
