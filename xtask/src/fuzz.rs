//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (its own crate, workspace and lock file).
//!
//! - `cargo xtask fuzz --seconds N [TARGET...]` runs every target (or the named ones) N seconds
//!   each and prints, per target, how long it ran, how many inputs it executed and whether it
//!   crashed. Not part of CI.
//! - `cargo xtask fuzz --build-only` builds every target with cargo-fuzz
//!   (`cargo fuzz build --dev --sanitizer none`) and replays the seed corpora and the regression
//!   inputs through them once (libFuzzer `-runs=0`). A cold run takes about 9 minutes (nightly,
//!   instrumented dependencies), so CI runs the cheaper equivalent in `cargo xtask lint` instead:
//!   the targets built and linked against libFuzzer on stable, and `cargo test` replaying every
//!   committed input through the same checks.
//!
//! Either way every committed input (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) is
//! replayed first. The same checks run on the stable toolchain with
//! `cargo test --manifest-path fuzz/Cargo.toml` (plus the named, ignored regression tests).
//!
//! cargo-fuzz and the nightly toolchain are installed when missing. libFuzzer's working corpus goes
//! to `fuzz/target/corpus/<target>/` (the committed seeds in `fuzz/corpus/<target>/` stay as they
//! are), crash inputs to `fuzz/artifacts/<target>/`, full logs to `fuzz/target/logs/<target>.log`.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{root, run, step};

/// The CI check: a quick build (debug, no sanitizer) that still links libFuzzer and instruments
/// the code, so the targets are known to build and the replayed inputs run through the checks.
const CHECK_BUILD: [&str; 3] = ["--dev", "--sanitizer", "none"];
/// Fuzzing: optimised, with debug assertions (integer overflow is a crash) and AddressSanitizer.
const RUN_BUILD: [&str; 2] = ["--release", "--debug-assertions"];

/// The targets, in the order they run (the `[[bin]]`s of `fuzz/Cargo.toml`).
const TARGETS: [&str; 8] = [
    "proxy_header",
    "toa_options",
    "id_template",
    "header_sanitisation",
    "ntlm_message",
    "http1_head",
    "http1_response",
    "http1_forward",
];

/// Longest input per target: a PROXY v2 header may be 4096 bytes (plus what follows it); the
/// others are small structures.
fn max_len(target: &str) -> usize {
    match target {
        "proxy_header" => 4200,
        "toa_options" => 128,
        // A request head up to the largest limit the target chooses (8 KiB), and a body.
        "http1_head" => 9000,
        // A request head up to the target's limit (16 KiB).
        "http1_forward" => 17000,
        // A response head up to past MAX_HEAD_BYTES.
        "http1_response" => 70000,
        _ => 2048,
    }
}

/// One target's run, as libFuzzer reported it.
struct Outcome {
    target: String,
    /// How long libFuzzer ran (its own count, or measured when it stopped early).
    seconds: Option<u64>,
    runs: Option<u64>,
    exec_per_sec: Option<u64>,
    corpus: Option<u64>,
    crashed: Option<String>,
}

pub fn run_fuzz(seconds: u64, build_only: bool, only: &[String]) -> Result<()> {
    let targets: Vec<&str> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in only {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t} (known: {})", TARGETS.join(", "));
            }
        }
        TARGETS
            .iter()
            .copied()
            .filter(|t| only.iter().any(|o| o == t))
            .collect()
    };
    let fuzz_dir = root().join("fuzz");
    let ebpf_object = ebpf_object(&fuzz_dir)?;

    ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let profile: &[&str] = if build_only { &CHECK_BUILD } else { &RUN_BUILD };
    step(&format!(
        "fuzz: building the targets (cargo fuzz build {})",
        profile.join(" ")
    ));
    let mut build = cargo_fuzz(&ebpf_object);
    build.arg("build").args(profile);
    run(&mut build)?;
    for target in &targets {
        replay(target, profile, &fuzz_dir, &ebpf_object)?;
    }
    if build_only {
        step("fuzz: every target builds, every seed and regression input passes its checks");
        return Ok(());
    }

    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, seconds, &fuzz_dir, &ebpf_object)?);
    }
    report(&outcomes);
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crashed.is_some()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} target(s) crashed; make each artifact a regression input (fuzz/regressions/<target>/) \
             and fix the cause",
            crashed.len()
        );
    }
    Ok(())
}

/// The eBPF object `ntlm-tag` embeds: the built one, or an empty placeholder (the fuzzed parsers
/// never load it) so fuzzing does not need the eBPF toolchain.
pub fn ebpf_object(fuzz_dir: &Path) -> Result<PathBuf> {
    if let Some(given) = std::env::var_os("NTLM_TAG_EBPF_OBJECT") {
        return Ok(PathBuf::from(given));
    }
    let built = built_ebpf_object();
    if built.is_file() {
        return Ok(built);
    }
    let placeholder = fuzz_dir.join("target/placeholder-ebpf-object");
    std::fs::create_dir_all(fuzz_dir.join("target"))?;
    if !placeholder.is_file() {
        std::fs::write(&placeholder, b"")?;
    }
    step("fuzz: no eBPF object built; embedding an empty placeholder (the parsers never load it)");
    Ok(placeholder)
}

/// Where `cargo xtask build-ebpf` puts the eBPF object (`ntlm-tag`'s build script looks there).
pub fn built_ebpf_object() -> PathBuf {
    root().join("ntlm-tag-ebpf/target/bpfel-unknown-none/release/ntlm-tag-ebpf")
}

fn ensure_nightly() -> Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed for the nightly toolchain cargo fuzz uses")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        return Ok(());
    }
    step("installing the nightly toolchain (cargo fuzz needs it)");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    step("installing cargo-fuzz");
    run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
}

/// `cargo fuzz` on nightly, free of settings inherited from the cargo that runs xtask.
fn cargo_fuzz(ebpf_object: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .env("NTLM_TAG_EBPF_OBJECT", ebpf_object)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args(["fuzz"]);
    cmd
}

/// Runs `target` once on every seed (`fuzz/corpus/<target>/`) and every input that once failed
/// (`fuzz/regressions/<target>/`), without fuzzing: libFuzzer's `-runs=0`.
fn replay(target: &str, profile: &[&str], fuzz_dir: &Path, ebpf: &Path) -> Result<()> {
    step(&format!(
        "fuzz: {target}: replaying seeds and regression inputs"
    ));
    let scratch = fuzz_dir.join("target/replay").join(target);
    std::fs::create_dir_all(&scratch)?;
    let mut cmd = cargo_fuzz(ebpf);
    cmd.arg("run").args(profile).arg(target).arg(&scratch);
    for dir in input_dirs(fuzz_dir, target) {
        cmd.arg(dir);
    }
    cmd.args(["--", "-runs=0"]);
    run(&mut cmd)
}

/// The committed inputs of `target`: its seeds and, if any, its regression inputs.
fn input_dirs(fuzz_dir: &Path, target: &str) -> Vec<PathBuf> {
    ["corpus", "regressions"]
        .iter()
        .map(|d| fuzz_dir.join(d).join(target))
        .filter(|d| d.is_dir())
        .collect()
}

fn run_target(target: &str, seconds: u64, fuzz_dir: &Path, ebpf: &Path) -> Result<Outcome> {
    step(&format!("fuzz: {target} for {seconds} s"));
    let work = fuzz_dir.join("target/corpus").join(target);
    let logs = fuzz_dir.join("target/logs");
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut cmd = cargo_fuzz(ebpf);
    cmd.arg("run").args(RUN_BUILD).arg(target).arg(&work);
    // libFuzzer adds what it finds to the first directory only: the committed inputs stay as they are.
    for dir in input_dirs(fuzz_dir, target) {
        cmd.arg(dir);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={}", max_len(target)))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    cmd.stdout(Stdio::inherit()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("cannot start cargo fuzz run")?;
    let mut fuzzing_since = None;
    let stderr = child.stderr.take().context("piped stderr")?;
    let mut outcome = Outcome {
        target: target.to_string(),
        seconds: None,
        runs: None,
        exec_per_sec: None,
        corpus: None,
        crashed: None,
    };
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        writeln!(log, "{line}")?;
        // libFuzzer's NEW/REDUCE lines are many; the log keeps them.
        let progress = line.starts_with('#')
            && (line.contains(" NEW ") || line.contains(" REDUCE ") || line.contains(" RELOAD "));
        if !progress {
            eprintln!("{line}");
        }
        if line.starts_with("INFO: Seed:") {
            fuzzing_since = Some(Instant::now());
        }
        parse_line(&line, &mut outcome);
    }
    let status = child.wait()?;
    if outcome.seconds.is_none() {
        outcome.seconds = fuzzing_since.map(|t| t.elapsed().as_secs());
    }
    if !status.success() && outcome.crashed.is_none() {
        outcome.crashed = Some(format!("exited with {status}; see {}", log_path.display()));
    }
    Ok(outcome)
}

fn parse_line(line: &str, o: &mut Outcome) {
    let number = |s: &str| s.trim().parse::<u64>().ok();
    if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
        o.runs = number(v);
    } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
        o.exec_per_sec = number(v);
    } else if let Some(rest) = line.strip_prefix("Done ") {
        // `Done 1593892 runs in 91 second(s)`
        o.seconds = rest
            .split(" in ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok());
    } else if let Some(rest) = line.split("Test unit written to ").nth(1) {
        o.crashed = Some(rest.trim().to_string());
    } else if line.starts_with('#')
        && line.contains("DONE")
        && let Some(corp) = line.split("corp: ").nth(1)
    {
        // `#12345 DONE cov: .. ft: .. corp: 95/3011b ..`
        o.corpus = corp.split('/').next().and_then(|n| n.trim().parse().ok());
    }
}

fn report(outcomes: &[Outcome]) {
    step("fuzz summary");
    eprintln!(
        "{:<22} {:>8} {:>14} {:>10} {:>8}  result",
        "target", "seconds", "executions", "exec/s", "corpus"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |n| n.to_string());
    for o in outcomes {
        eprintln!(
            "{:<22} {:>8} {:>14} {:>10} {:>8}  {}",
            o.target,
            show(o.seconds),
            show(o.runs),
            show(o.exec_per_sec),
            show(o.corpus),
            o.crashed
                .as_deref()
                .map_or_else(|| "no crash".to_string(), |c| format!("CRASH: {c}"))
        );
    }
}
