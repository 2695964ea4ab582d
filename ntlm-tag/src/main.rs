//! ntlm-tag: parse the configuration, set up logging, run. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;

use ntlm_tag::{
    app,
    cli::{self, Cli, Command, LogFormat},
    config::Config,
    conns,
};

/// Exit code for a bad configuration (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => match Config::load(&args) {
            Ok(config) => {
                for w in &config.warnings {
                    eprintln!("ntlm-tag: warning: {w}");
                }
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ntlm-tag: invalid configuration: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Some(Command::Conns { admin }) => match conns::print_table(admin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ntlm-tag: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Man) => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
            match man.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ntlm-tag: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Run(args)) => run(&args),
        None => run(&cli.run),
    }
}

fn run(args: &cli::RunArgs) -> ExitCode {
    let config = match Config::load(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ntlm-tag: invalid configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(config.log_format);
    let runtime = match app::build_runtime(config.workers) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(app::run(config, args.clone()));
    // Dropping the runtime ends every task, which releases the kernel programs and the cgroup.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) if e.is::<app::EbpfRequiredError>() => {
            tracing::error!("{e:#}");
            ExitCode::from(app::EXIT_EBPF_UNAVAILABLE)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("NTLM_TAG_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
