//! Running vng (and the qemu it starts) as one process group, its console copied to a log file and
//! the guest's progress lines echoed here.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::sys::interrupts::{self, Live};

/// Runs `cmd` in its own process group with stdout and stderr copied to `log` (a pipe, not the
/// file itself: qemu reopens its output path and would garble a file), echoing the guest's
/// progress lines (`vm: ...`). Kills the whole group after `timeout`; `None` then.
pub fn run_logged(
    mut cmd: Command,
    log: &Path,
    label: &str,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    use std::os::unix::process::CommandExt;
    let file = Arc::new(Mutex::new(
        fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?,
    ));
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let live = Live::Group(child.id());
    let _live = interrupts::track(live.clone());
    let readers = [
        child.stdout.take().map(|s| copy_lines(s, &file, label)),
        child.stderr.take().map(|s| copy_lines(s, &file, label)),
    ];
    let status = interrupts::wait_or_kill(child, timeout, &live)?;
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    Ok(status)
}

fn copy_lines(
    from: impl std::io::Read + Send + 'static,
    to: &Arc<Mutex<fs::File>>,
    label: &str,
) -> thread::JoinHandle<()> {
    let to = Arc::clone(to);
    let label = label.to_string();
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if let Some(progress) = line.strip_prefix("vm: ") {
                eprintln!("[{label}] {progress}");
            }
            if let Ok(mut f) = to.lock() {
                let _ = writeln!(f, "{line}");
            }
        }
    })
}
