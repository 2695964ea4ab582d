//! The acceptor's stdout, read so that [`AcceptorLog::records`] is never behind what the acceptor
//! has already answered.
//!
//! The acceptor writes (and flushes) a request's JSON line before it returns the response, so once
//! a client holds the response the line is in the pipe. A background thread keeps the pipe drained
//! (a full pipe would stall the acceptor); it waits for data with `poll` and reads only under the
//! lock, non-blocking. `records` takes the same lock and reads whatever is still in the pipe itself,
//! so a line is either already parsed or read then: no window in which a test sees an older log.

use std::{
    io::{ErrorKind, Read},
    os::fd::AsRawFd,
    process::ChildStdout,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

struct Inner {
    stdout: ChildStdout,
    partial: Vec<u8>,
    records: Vec<Value>,
    ready: bool,
    closed: bool,
}

impl Inner {
    /// Reads everything the pipe holds now (non-blocking) and parses the complete lines.
    fn drain(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stdout.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            if line.starts_with("ntlm-acceptor ready") {
                self.ready = true;
            } else if let Ok(v) = serde_json::from_str(&line) {
                self.records.push(v);
            }
        }
    }
}

#[derive(Clone)]
pub struct AcceptorLog(Arc<Mutex<Inner>>);

impl AcceptorLog {
    /// Takes over the acceptor's stdout and starts the thread that keeps the pipe drained.
    pub fn new(stdout: ChildStdout) -> AcceptorLog {
        let fd = stdout.as_raw_fd();
        // SAFETY: fcntl on a pipe descriptor this struct owns from here on.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let log = AcceptorLog(Arc::new(Mutex::new(Inner {
            stdout,
            partial: Vec::new(),
            records: Vec::new(),
            ready: false,
            closed: false,
        })));
        let background = log.clone();
        std::thread::spawn(move || {
            loop {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call. The timeout lets the thread notice
                // that the acceptor is gone without a wake-up of its own.
                unsafe { libc::poll(&mut pfd, 1, 200) };
                let mut inner = background.0.lock().expect("acceptor log");
                inner.drain();
                if inner.closed || Arc::strong_count(&background.0) == 1 {
                    return;
                }
            }
        });
        log
    }

    /// Waits until the acceptor said it is listening; false when it did not within `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut inner = self.0.lock().expect("acceptor log");
                inner.drain();
                if inner.ready {
                    return true;
                }
                if inner.closed {
                    return false;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every request record written so far, including those still in the pipe.
    pub fn records(&self) -> Vec<Value> {
        let mut inner = self.0.lock().expect("acceptor log");
        inner.drain();
        inner.records.clone()
    }
}
