//! ntlm-tag: parse the configuration, set up logging, run. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;

use ntlm_tag::{
    admin::client::{
        conns,
        reload::{self, Reloaded},
    },
    app,
    cli::{self, Cli, Command, LogFormat},
    config::Config,
    epa,
    kernel::{EbpfMode, privileges::PrivilegeError, support},
    manual, preflight, ready_deadline,
};

/// mimalloc (see `allocator`): its thread-local free lists serve the per-request allocations in a
/// few dozen instructions each.
#[global_allocator]
static ALLOCATOR: ntlm_tag::allocator::Allocator = ntlm_tag::allocator::Allocator;

/// Exit code for a bad configuration (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Conns { admin, token_file }) => {
            match conns::print_table(&admin, token_file.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ntlm-tag: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Reload { admin, token_file }) => {
            match reload::request(&admin, token_file.as_deref()) {
                Ok(Reloaded::Applied(summary)) => {
                    println!("ntlm-tag: {summary}");
                    ExitCode::SUCCESS
                }
                Ok(Reloaded::Refused(reason)) => {
                    eprintln!("ntlm-tag: {reason}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                Err(e) => {
                    eprintln!("ntlm-tag: reload: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Man { page }) => match manual::render(page, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ntlm-tag: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Completions { shell }) => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "ntlm-tag", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(Command::Run(args)) => run(&args, false),
        Some(Command::Upgrade(args)) => {
            if std::env::var_os(UPGRADE_DETACHED).is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stdin())
            {
                detach_upgrade()
            } else {
                upgrade(&args)
            }
        }
        None => run(&cli.run, false),
    }
}

/// Loads and verifies the configuration as `run` would, then says what the kernel supports; exits
/// 64 on a configuration error and 69 when `ebpf = "required"` cannot work here.
fn check(args: &cli::RunArgs) -> ExitCode {
    let config = match load_verified(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for w in &config.warnings {
        eprintln!("ntlm-tag: warning: {w}");
    }
    print!("{}", config.to_toml());
    if config.ebpf.mode == EbpfMode::Off {
        eprintln!("ntlm-tag: eBPF off: the kernel is not probed");
    } else {
        let support = support::probe(!config.ebpf.xdp_interfaces.is_empty());
        eprint!("ntlm-tag: {support}");
        if config.ebpf.mode == EbpfMode::Required && !support.usable() {
            eprintln!(
                "ntlm-tag: ebpf = \"required\" cannot work on this host (see above); fix that, or \
                 use ebpf = \"auto\" to run on peer addresses"
            );
            return ExitCode::from(app::EXIT_EBPF_UNAVAILABLE);
        }
    }
    let bridging = check_bridging(&config);
    if bridging == ExitCode::SUCCESS {
        eprintln!("ntlm-tag: configuration OK");
    }
    bridging
}

/// `check` with `epa_bridging`: one `# epa_bridging: ...` line per (listener, backend) pair; 64
/// when a certificate differs or cannot be read.
fn check_bridging(config: &Config) -> ExitCode {
    if !config.epa_bridging {
        return ExitCode::SUCCESS;
    }
    let findings = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(epa::bridging::verify(
                &config.listeners,
                &config.all_backends(),
                config.timeouts.upstream_connect,
            ))
            .map_err(anyhow::Error::from)
        });
    match findings {
        Ok(findings) => {
            findings.iter().for_each(|f| println!("# {f}"));
            if findings.iter().any(epa::bridging::Finding::is_mismatch) {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ntlm-tag: epa_bridging: {e:#}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// The configuration, checked against what it names (files, user, interfaces, backends); on an
/// error, the message is printed and the exit code returned.
fn load_verified(args: &cli::RunArgs) -> Result<Config, ExitCode> {
    match Config::load(args).and_then(|c| preflight::verify(&c).map(|()| c)) {
        Ok(config) => Ok(config),
        Err(e) => {
            eprintln!("ntlm-tag: invalid configuration: {e}");
            Err(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

/// Set in the environment of the gateway an interactive `ntlm-tag upgrade` starts in the background.
const UPGRADE_DETACHED: &str = "NTLM_TAG_UPGRADE_DETACHED";

/// `ntlm-tag upgrade` typed at a terminal: the new gateway must outlive the command (and not stop
/// on the terminal's Ctrl-C), so it runs as a copy of this command in a process group of its own;
/// this one waits for the line that says the hand-over is done (or for the copy to fail) and
/// exits with the result.
fn detach_upgrade() -> ExitCode {
    use std::{io::BufRead as _, os::unix::process::CommandExt as _, process::Stdio};
    let started = std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(UPGRADE_DETACHED, "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
    });
    let mut child = match started {
        Ok(child) => child,
        Err(e) => {
            eprintln!("ntlm-tag: cannot start the new gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    }
    if line.starts_with(app::TOOK_OVER) {
        print!("{line}");
        return ExitCode::SUCCESS;
    }
    // No line: the new gateway stopped before it took over (it said why on stderr).
    match child.wait() {
        Ok(status) => ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        ),
        Err(_) => ExitCode::FAILURE,
    }
}

/// `ntlm-tag upgrade`, in the process that becomes the new gateway: the start-up deadline first
/// (reading the configuration may be what blocks), then `run`'s start-up, taking over.
fn upgrade(args: &cli::UpgradeArgs) -> ExitCode {
    let timeout = std::time::Duration::from_secs(args.ready_timeout);
    if let Err(e) = ready_deadline::arm(timeout) {
        eprintln!("ntlm-tag: upgrade: cannot set the --ready-timeout deadline: {e}");
        return ExitCode::FAILURE;
    }
    run(&args.run, true)
}

/// Runs the gateway; with `upgrade`, after taking the listeners over from the running one.
fn run(args: &cli::RunArgs, upgrade: bool) -> ExitCode {
    let config = match load_verified(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_tracing(config.log_format);
    // Before the runtime: the user switch must happen while the process has one thread.
    let prepared = match app::prepare(&config, upgrade) {
        Ok(prepared) => prepared,
        Err(e) => return failed(&e),
    };
    ready_deadline::entering(ready_deadline::Step::Starting);
    let runtime = match app::build_runtime(config.workers) {
        Ok(rt) => rt,
        Err(e) => return failed(&e),
    };
    let result = runtime.block_on(app::run(config, args.clone(), prepared));
    // Dropping the runtime ends every task, which releases the kernel programs and the cgroup.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e),
    }
}

/// Logs why the gateway stopped and picks the exit code: 64 for a `user` that does not exist, 69
/// when `--ebpf required` cannot be honoured, 77 when the user switch did not leave exactly what was
/// intended (none of them fixes itself on a restart), 1 otherwise.
fn failed(e: &anyhow::Error) -> ExitCode {
    tracing::error!("{e:#}");
    if let Some(PrivilegeError::NoSuchUser(_)) = e.downcast_ref::<PrivilegeError>() {
        ExitCode::from(EXIT_BAD_CONFIG)
    } else if e.is::<app::BridgingMismatch>() {
        ExitCode::from(EXIT_BAD_CONFIG)
    } else if e.is::<app::EbpfRequiredError>() {
        ExitCode::from(app::EXIT_EBPF_UNAVAILABLE)
    } else if e.is::<PrivilegeError>() {
        ExitCode::from(app::EXIT_PRIVILEGES)
    } else {
        ExitCode::FAILURE
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("NTLM_TAG_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal who did not ask for none (NO_COLOR, no-color.org):
    // journald and log files get plain text.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !no_color;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
