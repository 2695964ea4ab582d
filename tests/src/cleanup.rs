//! Last-resort cleanup for a process that is being interrupted: its namespaces (named
//! `nt<pid>-...`), the gateways it started (children) and their cgroups.

use std::process::Command;

/// Kills `pid`'s child processes and deletes its namespaces.
pub fn remove_everything_of(pid: u32) {
    let _ = Command::new("pkill")
        .args(["-TERM", "-P", &pid.to_string()])
        .status();
    // Test cgroups (TOA writers) of this process; the gateways remove their own on SIGTERM.
    if let Some(parent) = crate::gateway::own_cgroup()
        && let Ok(entries) = std::fs::read_dir(&parent)
    {
        let mine = format!("ntlm-tag-test.{pid}.");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&mine) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
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
