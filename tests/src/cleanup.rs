//! Last-resort cleanup for a process that is being interrupted: its namespaces (named
//! `nt<pid>-...`), the gateways it started (children) and their cgroups.

use std::process::Command;

/// Kills `pid`'s child processes and deletes its namespaces.
pub fn remove_everything_of(pid: u32) {
    let _ = Command::new("pkill")
        .args(["-TERM", "-P", &pid.to_string()])
        .status();
    let prefix = format!("nt{pid}-");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&prefix) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}
