//! The results of one kernel's run, read back from its directory: libtest's counts, the failing
//! tests and what else went wrong, as the one line per kernel the command prints.

use std::{fs, path::Path, process::ExitStatus, time::Duration};

use anyhow::{Result, bail};

use super::Plan;
use crate::root;

/// Failing tests named on a kernel's line; the rest are in its `failures.txt`.
const LISTED_FAILURES: usize = 12;

/// libtest's counts and failures of one kernel's run, read back from its results directory.
pub struct Report {
    label: String,
    release: String,
    passed: u32,
    failed: u32,
    ignored: u32,
    failures: Vec<String>,
    problems: Vec<String>,
    elapsed: Duration,
}

impl Report {
    pub fn read(
        plan: &Plan,
        label: &str,
        release: &str,
        results: &Path,
        vm_status: Option<Option<ExitStatus>>,
        elapsed: Duration,
    ) -> Report {
        let mut report = Report {
            label: label.to_string(),
            release: release.to_string(),
            passed: 0,
            failed: 0,
            ignored: 0,
            failures: Vec::new(),
            problems: Vec::new(),
            elapsed,
        };
        let names: Vec<&str> = plan.tests.iter().map(|t| t.name.as_str()).collect();
        for name in names {
            report.add_binary(name, results);
        }
        if !results.join("done").is_file() {
            report.problems.push(format!(
                "the run did not finish (see {})",
                results.join("console.log").display()
            ));
        }
        match vm_status {
            Some(None) => report.problems.push("the VM timed out".to_string()),
            Some(Some(s)) if !s.success() && report.failures.is_empty() => {
                report.problems.push(format!("vng exited with {s}"));
            }
            _ => {}
        }
        let _ = fs::write(results.join("failures.txt"), report.why().join("\n") + "\n");
        report
    }

    fn add_binary(&mut self, name: &str, results: &Path) {
        let out = fs::read_to_string(results.join(format!("{name}.out"))).unwrap_or_default();
        let rc = fs::read_to_string(results.join(format!("{name}.rc")))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        let summary = out.lines().rev().find_map(parse_summary);
        if let Some((p, f, i)) = summary {
            self.passed += p;
            self.failed += f;
            self.ignored += i;
        }
        let failed: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
            .map(|t| format!("{name}::{t}"))
            .collect();
        self.failures.extend(failed);
        match (rc, summary) {
            (None, _) => self.problems.push(format!("{name} did not finish")),
            (Some(124), _) => self.problems.push(format!("{name} timed out")),
            (Some(rc), None) => self
                .problems
                .push(format!("{name} exited {rc} without a test summary")),
            (Some(rc), Some((_, 0, _))) if rc != 0 => {
                self.problems.push(format!("{name} exited {rc}"));
            }
            _ => {}
        }
    }

    fn passed_all(&self) -> bool {
        self.failed == 0 && self.failures.is_empty() && self.problems.is_empty()
    }

    pub fn line(&self) -> String {
        let verdict = if self.passed_all() { "PASS" } else { "FAIL" };
        let host = if self.label == "host" { " (host)" } else { "" };
        let mut line = format!(
            "kernel {}{host}: {verdict} ({} passed, {} failed, {} ignored) in {}",
            self.release,
            self.passed,
            self.failed,
            self.ignored,
            minutes(self.elapsed)
        );
        let why = self.why();
        if !why.is_empty() {
            let shown = &why[..why.len().min(LISTED_FAILURES)];
            line.push_str(&format!(": {}", shown.join(", ")));
            if why.len() > shown.len() {
                line.push_str(&format!(
                    " and {} more (all in target/vm-results/{}/failures.txt)",
                    why.len() - shown.len(),
                    self.label
                ));
            }
        }
        line
    }

    /// Failing tests, then other problems (a binary that crashed, a VM that timed out).
    fn why(&self) -> Vec<&str> {
        self.failures
            .iter()
            .chain(&self.problems)
            .map(String::as_str)
            .collect()
    }
}

/// `test result: ok. 9 passed; 1 failed; 2 ignored; ...` → (9, 1, 2).
fn parse_summary(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.strip_prefix("test result: ")?.split_once(". ")?.1;
    let count = |what: &str| {
        rest.split("; ")
            .find_map(|part| part.strip_suffix(what)?.trim().parse::<u32>().ok())
    };
    Some((count(" passed")?, count(" failed")?, count(" ignored")?))
}

fn minutes(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

pub fn summarize(reports: &[Report]) -> Result<()> {
    eprintln!();
    for r in reports {
        println!("{}", r.line());
    }
    println!(
        "outputs: {}/<kernel>/<test binary>.out",
        root().join("target/vm-results").display()
    );
    let failed = reports.iter().filter(|r| !r.passed_all()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} kernels failed; each test binary's output (gateway log lines included) \
             is in target/vm-results/<kernel>/",
            reports.len()
        );
    }
    Ok(())
}
