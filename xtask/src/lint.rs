//! `cargo xtask lint`: formatting, clippy, the import-cycle check between modules, the packaged
//! systemd unit and the fuzz crate, as CI runs them.

mod module_cycles;

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, fuzz, root, run, step, unit};

pub fn lint() -> Result<()> {
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("eBPF crate: cargo fmt --check");
    run(Command::new("cargo")
        .current_dir(root().join("ntlm-tag-ebpf"))
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .args(["fmt", "--check"]))?;
    unit::check()?;
    fuzz_check()?;
    // Last, so that a knot being untied elsewhere does not hide the other checks' results.
    import_cycles()
}

/// The fuzz crate (its own workspace): formatting, lints, and the CI check that the fuzz targets
/// build. On stable, without cargo-fuzz's instrumentation: the targets are compiled and linked
/// against libFuzzer exactly as written (`cargo build --bins`), and every seed and regression
/// input is replayed through their checks (`cargo test`). What `cargo fuzz build` adds on top
/// (nightly, sanitizer coverage) costs minutes of compiling and checks nothing more of our code.
/// Measured on 2 cores from an empty fuzz/target: clippy 132 s, build 187 s, test 2 s (~5.4 min,
/// against ~9 min for a cold `cargo fuzz build`); seconds when warm.
fn fuzz_check() -> Result<()> {
    let fuzz_dir = root().join("fuzz");
    // The fuzzed code never loads the eBPF object: without a built one, embed a placeholder.
    let placeholder = if fuzz::built_ebpf_object().is_file() {
        None
    } else {
        Some(fuzz::ebpf_object(&fuzz_dir)?)
    };
    let fuzz = || {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir).env_remove("CARGO_TARGET_DIR");
        if let Some(p) = &placeholder {
            cmd.env("NTLM_TAG_EBPF_OBJECT", p);
        }
        cmd
    };
    step("fuzz crate: cargo fmt --check");
    run(fuzz().args(["fmt", "--check"]))?;
    step("fuzz crate: cargo clippy -D warnings");
    run(fuzz().args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("fuzz crate: the targets build and link against libFuzzer");
    run(fuzz().args(["build", "--locked", "--bins"]))?;
    step("fuzz crate: every seed and regression input passes its target's checks");
    run(fuzz().args(["test", "--locked"]))
}

/// Every library and binary of the workspace, the gateway first: no cycle between its top-level
/// modules (see [`module_cycles`]). Prints each cycle with where its uses are, then fails.
fn import_cycles() -> Result<()> {
    step("import cycles between the modules of each crate");
    let mut found = 0;
    for (name, root_file) in workspace_crates()? {
        let graph = module_cycles::ModuleGraph::read(&root_file)
            .with_context(|| format!("cannot read the modules of {name}"))?;
        for cycle in graph.cycles() {
            found += 1;
            eprintln!("import cycle in {name}: {}", cycle.arrows());
            for (from, site) in cycle.path.iter().zip(&cycle.sites) {
                let file = site.file.strip_prefix(root()).unwrap_or(&site.file);
                eprintln!(
                    "    {from}: {}:{} uses {}",
                    file.display(),
                    site.line,
                    site.path
                );
            }
            if !cycle.also.is_empty() {
                eprintln!("    also in this knot: {}", cycle.also.join(", "));
                eprintln!("    every use inside the knot:");
                for (from, to, site) in &cycle.knot_edges {
                    let file = site.file.strip_prefix(root()).unwrap_or(&site.file);
                    eprintln!("      {from} → {to}: {}:{}", file.display(), site.line);
                }
            }
        }
    }
    if found > 0 {
        bail!(
            "{found} import cycle(s) between modules (above): move what both sides need into a \
             module below both, or turn one use around"
        );
    }
    Ok(())
}

/// `(label, root file)` of every lib and bin target of the workspace, `ntlm-tag` first.
fn workspace_crates() -> Result<Vec<(String, std::path::PathBuf)>> {
    let out = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let mut crates = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or("?");
        for target in package["targets"].as_array().into_iter().flatten() {
            let kinds: Vec<&str> = target["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
                .collect();
            let kind = match kinds.as_slice() {
                ["lib" | "rlib" | "proc-macro", ..] => "lib",
                ["bin"] => "bin",
                _ => continue,
            };
            let target_name = target["name"].as_str().unwrap_or("?");
            let label = if kind == "lib" {
                format!("{name} (lib)")
            } else {
                format!("{name} (bin {target_name})")
            };
            let src = target["src_path"].as_str().unwrap_or_default();
            crates.push((name != "ntlm-tag", label, std::path::PathBuf::from(src)));
        }
    }
    crates.sort_by_key(|(later, _, _)| *later);
    Ok(crates.into_iter().map(|(_, l, p)| (l, p)).collect())
}
