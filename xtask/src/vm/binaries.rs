//! The integration test binaries: built once on the host, the ones `--only` names chosen, and
//! staged without debug info where every kernel's run reads them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};

use crate::{cargo, root, run, step};

/// The binary that `NTLM_TAG_VM_SELFTEST_FAIL=1` makes fail on purpose.
const SELFTEST_BINARY: &str = "harness_selftest";

/// An integration test binary (`tests/*.rs` of a workspace crate).
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

pub fn build() -> Result<Vec<TestBinary>> {
    step("building the integration test binaries");
    let out = cargo()
        .args([
            "test",
            "--locked",
            "--workspace",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "building the test binaries failed ({}); fix the build, then rerun",
        out.status
    );
    let tests: Vec<TestBinary> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(integration_test_artifact)
        .collect();
    for (i, t) in tests.iter().enumerate() {
        ensure!(
            tests[..i].iter().all(|u| u.name != t.name),
            "two integration test binaries are named {}; rename one (tests/{}.rs)",
            t.name,
            t.name
        );
    }
    ensure!(
        !tests.is_empty(),
        "cargo built no integration test binaries (targets of kind `test`)"
    );
    Ok(tests)
}

/// The binaries `--only` names (all without it), plus the self-test binary when it must fail.
pub fn select(all: Vec<TestBinary>, only: &[String], selftest: bool) -> Result<Vec<TestBinary>> {
    for name in only {
        ensure!(
            all.iter().any(|t| &t.name == name),
            "--only {name}: no such integration test binary (there are: {})",
            all.iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|t| {
            only.is_empty() || only.contains(&t.name) || (selftest && t.name == SELFTEST_BINARY)
        })
        .collect())
}

/// The integration test binary a `cargo --message-format=json` line announces, if it is one.
fn integration_test_artifact(line: &str) -> Option<TestBinary> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    let target = &message["target"];
    if target["kind"].as_array()?.iter().all(|k| k != "test") {
        return None;
    }
    Some(TestBinary {
        name: target["name"].as_str()?.to_string(),
        path: PathBuf::from(message["executable"].as_str()?),
    })
}

/// Copies the gateway and the test binaries, without debug info, into `dir`: a private snapshot a
/// concurrent build cannot replace mid-run, and a fraction of the bytes the guest reads over 9p.
pub fn stage(tests: &[TestBinary], dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    strip_into(&gateway_binary(), &dir.join("ntlm-tag"))?;
    for t in tests {
        strip_into(&t.path, &dir.join(&t.name))?;
    }
    Ok(dir.to_path_buf())
}

/// Set to a gateway binary to run in the guest instead of the debug build (e.g.
/// `target/release/ntlm-tag` for the memory figures of the 100,000-connection test).
const GATEWAY_ENV: &str = "NTLM_TAG_VM_GATEWAY";

fn gateway_binary() -> PathBuf {
    std::env::var_os(GATEWAY_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/ntlm-tag"))
}

fn strip_into(from: &Path, to: &Path) -> Result<()> {
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from))
    .with_context(|| {
        format!(
            "cannot copy {} without debug info; `apt-get install binutils` provides strip",
            from.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_integration_test_artifacts_only() {
        let test = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"faults","src_path":"/w/tests/tests/faults.rs"},"executable":"/w/target/debug/deps/faults-0123"}"#;
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"ntlm_tag"},"executable":null}"#;
        let unit = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"ntlm-tag"},"executable":"/w/target/debug/deps/ntlm_tag-4567"}"#;
        let t = integration_test_artifact(test).expect("an integration test");
        assert_eq!(
            (t.name.as_str(), t.path.to_str()),
            ("faults", Some("/w/target/debug/deps/faults-0123"))
        );
        assert!(integration_test_artifact(lib).is_none());
        assert!(integration_test_artifact(unit).is_none());
        assert!(integration_test_artifact("Compiling ntlm-tag").is_none());
    }
}
