//! A real `ntlm-tag` process started inside a namespace, stopped (and its leftovers checked) on drop.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

mod admin;
mod builder;
mod cgroup;

pub use admin::{Admin, AdminResponse};
pub use builder::{GatewayBuilder, Mode, Upstream};
pub use cgroup::{Crashed, cgroup2_mount, own_cgroup, remove_leftover_cgroup, walk_named};

use crate::netns::NetNs;
use crate::wait::{TIME_SCALE_ENV, eventually_within, scaled, time_scale};
use admin::AdminDir;

/// Path of the `ntlm-tag` binary under test: `$NTLM_TAG_BIN`, or the workspace's debug build.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("NTLM_TAG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ntlm-tag")
        });
    assert!(
        path.is_file(),
        "{} not found: build it first (cargo xtask test does)",
        path.display()
    );
    path
}

static ECHO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether gateways echo their log lines to stderr (on by default, so failing tests show them).
pub fn set_echo(on: bool) {
    ECHO.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// How long a gateway may take to print its ready line (times [`time_scale`]); past it the harness
/// kills it (SIGKILL) and reports "exited (signal: 9) before it was ready" with its log.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running gateway with its log lines.
pub struct Gateway {
    child: Option<Child>,
    pub admin: Admin,
    _admin_dir: Option<AdminDir>,
    log: Arc<Log>,
}

/// The lines a thread reads from the gateway's stderr, and a wake-up for those waiting on them.
///
/// The gateway writes a line before it acts on what comes next (its writer is synchronous), but this
/// reader is another thread: a client can hold a response before the line written ahead of it has
/// arrived here. Hence the waits below; reading [`Gateway::log`] directly is only sure for lines up to
/// the ready line (start-up waits for it) and once [`Gateway::stop_with_log`] has read to the end.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// The pipe is at its end: every line the gateway wrote is in `lines`.
    ended: bool,
}

impl Log {
    /// Waits until `check` holds on the lines read so far; None when `timeout` passes first or
    /// the pipe ends without it.
    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("log");
        loop {
            if let Some(found) = check(&state.lines) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if state.ended {
                return None;
            }
            state = self.changed.wait_timeout(state, left).expect("log").0;
        }
    }
}

/// How a start attempt ended.
pub enum Started {
    Ready(Gateway),
    Exited {
        status: ExitStatus,
        log: Vec<String>,
    },
}

impl Started {
    /// The gateway, which must have started; panics with its log otherwise.
    pub fn ready(self) -> Gateway {
        match self {
            Started::Ready(gateway) => gateway,
            Started::Exited { status, log } => panic!(
                "ntlm-tag exited ({status}) before it was ready:\n{}",
                log.join("\n")
            ),
        }
    }
}

impl Gateway {
    /// Starts `ntlm-tag` in `ns` with exactly `args` (plus the harness's admin socket) and waits
    /// for its ready line. Tests describe their gateway with [`Gateway::new`] instead; this is for
    /// callers that already hold a command line (the demo).
    pub fn start(ns: &NetNs, args: &[&str]) -> Gateway {
        Self::spawn(ns, args, None, &[]).ready()
    }

    /// Starts `ntlm-tag` in `ns` with `args` plus `--admin unix:<a socket in a directory of its
    /// own>` (unless `args` name an admin endpoint), through `wrapper` if given, and waits for its
    /// ready line.
    fn spawn(ns: &NetNs, args: &[&str], wrapper: Option<&[&str]>, env: &[(&str, &str)]) -> Started {
        // The admin endpoint: the one in `args`, or a unix socket of this gateway's own added.
        let given = args
            .iter()
            .position(|a| *a == "--admin")
            .and_then(|i| args.get(i + 1));
        let admin_dir = given.is_none().then(|| AdminDir::new(wrapper.is_some()));
        let admin = match (given, &admin_dir) {
            (Some(a), _) => match a.strip_prefix("unix:") {
                Some(path) => Admin::Unix(PathBuf::from(path)),
                None => Admin::Tcp {
                    addr: a.parse().expect("--admin address"),
                    ns_path: ns.path(),
                },
            },
            (None, Some(dir)) => Admin::Unix(dir.0.join("admin.sock")),
            (None, None) => unreachable!("a directory is made when no endpoint is given"),
        };
        let bin = binary();
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = ns.command(w[0]);
                c.args(&w[1..]).arg(&bin);
                c
            }
            None => ns.command(bin.to_str().expect("utf-8 path")),
        };
        cmd.args(args)
            .args(if given.is_some() {
                vec![]
            } else {
                vec!["--admin".to_string(), admin.arg()]
            })
            .env("NTLM_TAG_LOG", "info,ntlm_tag=debug")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ntlm-tag");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Log::default());
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    if ECHO.load(std::sync::atomic::Ordering::Relaxed) {
                        eprintln!("[ntlm-tag] {line}");
                    }
                    log.state.lock().expect("log").lines.push(line);
                    log.changed.notify_all();
                }
                log.state.lock().expect("log").ended = true;
                log.changed.notify_all();
            });
        }
        let mut gateway = Gateway {
            child: Some(child),
            admin,
            _admin_dir: admin_dir,
            log,
        };
        match gateway.wait_for_line("ntlm-tag ready", scaled(READY_TIMEOUT)) {
            Some(_) => Started::Ready(gateway),
            None => {
                let mut child = gateway.child.take().expect("child");
                let _ = child.kill();
                let status = child.wait().expect("wait");
                // Let the reader thread drain what is left.
                gateway.read_to_end(scaled(Duration::from_secs(2)));
                let mut log = gateway.log();
                if status.signal() == Some(libc::SIGKILL) {
                    log.push(format!(
                        "(test harness: no ready line within {:?}, so it killed the gateway; {}={} \
                         scales this wait)",
                        scaled(READY_TIMEOUT),
                        TIME_SCALE_ENV,
                        time_scale()
                    ));
                }
                Started::Exited { status, log }
            }
        }
    }

    /// Waits until a log line containing `needle` arrives (or was already logged); returns the
    /// first such line.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_line_where(|l| l.contains(needle), timeout)
    }

    /// Waits until a log line that `matches` arrives (or was already logged); returns the first.
    pub fn wait_for_line_where(
        &self,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        self.log.wait_until(timeout, |lines| {
            lines.iter().find(|l| matches(l.as_str())).cloned()
        })
    }

    /// The lines read so far. Every line up to the ready line is here once the gateway started;
    /// a later one may still be on its way: to assert that a line is there, wait for it
    /// ([`Gateway::wait_for_line`]); to assert that none is, read the whole log
    /// ([`Gateway::stop_with_log`]) or first wait for a line the gateway writes after it.
    pub fn log(&self) -> Vec<String> {
        self.log.state.lock().expect("log").lines.clone()
    }

    /// Waits until the reader has reached the end of the gateway's stderr, for as long as lines
    /// keep coming (a backlog takes what it takes); false once `quiet` passes without a line and
    /// without the end (a process the gateway handed its stderr to still holds it).
    fn read_to_end(&self, quiet: Duration) -> bool {
        let mut state = self.log.state.lock().expect("log");
        loop {
            if state.ended {
                return true;
            }
            let read = state.lines.len();
            let (next, waited) = self
                .log
                .changed
                .wait_timeout_while(state, quiet, |s| !s.ended && s.lines.len() == read)
                .expect("log");
            if waited.timed_out() {
                return next.ended;
            }
            state = next;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// GET on the admin endpoint (as root), parsed as JSON.
    pub fn admin_json(&self, path: &str) -> Value {
        self.admin.json(path)
    }

    /// GET `/metrics` (Prometheus text).
    pub fn admin_metrics(&self) -> String {
        let r = self.admin.get("/metrics", &[]);
        assert_eq!(r.status, 200, "/metrics: {}", r.body);
        r.body
    }

    /// The sample `name{labels}` of `/metrics` (see [`crate::metrics::sample`]).
    pub fn metric(&self, name: &str, labels: &str) -> Option<u64> {
        crate::metrics::sample(&self.admin_metrics(), name, labels)
    }

    /// Waits until `check` holds on `/metrics` (see [`crate::wait::eventually`]); returns the text.
    pub fn wait_for_metrics(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        crate::wait::eventually(what, || self.admin_metrics(), |text| check(text))
    }

    /// Waits (polling the admin listener, with a deadline) until `check` holds on `/kernel`.
    pub fn wait_for_kernel(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually_within(
            &format!("{what} (/kernel)"),
            scaled(Duration::from_secs(20)),
            || self.admin_json("/kernel"),
            |kernel| check(kernel),
        )
    }

    /// Waits (up to `timeout`) for the process to exit by itself; None if it is still running.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit; the process must leave no cgroup behind.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    /// [`Gateway::stop`], then every line the gateway wrote (its stderr read to the end): for
    /// asserting that a line never came, which [`Gateway::log`] cannot show while lines may still
    /// be on their way.
    pub fn stop_with_log(mut self) -> (ExitStatus, Vec<String>) {
        let status = self.terminate();
        assert!(
            self.read_to_end(scaled(Duration::from_secs(5))),
            "the gateway's stderr stayed open after it exited:\n{}",
            self.log().join("\n")
        );
        (status, self.log())
    }

    /// Sends `signal` (e.g. SIGHUP) without waiting for anything.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGKILL, as a crash would: nothing of the gateway's own cleanup runs. Its leftover cgroup stays
    /// for the next start to remove; the returned guard removes it if the test ends first.
    pub fn kill(mut self) -> Crashed {
        let pid = self.pid();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Crashed { pid }
    }

    fn terminate(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("already stopped");
        };
        let pid = child.id();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + scaled(Duration::from_secs(15));
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        remove_leftover_cgroup(pid);
        status
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
    }
}

/// A counter of the kernel programs from `/kernel`'s JSON.
pub fn kernel_counter(kernel: &Value, name: &str) -> u64 {
    kernel["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {kernel:#}"))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
