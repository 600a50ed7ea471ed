//! The `tracer` command: parse flags, run the subcommand, print any error as one line.

use std::process::ExitCode;

use clap::Parser;
use tracer::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version print on stdout and succeed.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "tracer: {}; see 'tracer --help'",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Escaped: an error may quote what a file, the kernel or a fake agent said.
            let text = format!("{e:#}");
            eprintln!(
                "tracer: {}",
                tracer::stream::event::Printable(text.as_bytes())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_log();
    match cli.command {
        Command::Completions(args) => return tracer::cmd::docs::completions(args.shell),
        Command::Man(args) => return tracer::cmd::docs::man(args.dir.as_deref()),
        Command::Sockets(_) => {}
        _ => stop_on_signals()?,
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    match cli.command {
        Command::Run(args) => runtime.block_on(tracer::cmd::run::run(&args))?,
        Command::Sockets(args) => tracer::cmd::sockets::run(&args)?,
        Command::Top(args) => runtime.block_on(tracer::cmd::top::run(&args))?,
        Command::Watch(args) => {
            let summary = runtime.block_on(tracer::cmd::watch::run(&args))?;
            eprintln!(
                "tracer: {} events received, {} printed, {} lost",
                summary.received, summary.printed, summary.lost
            );
        }
        // Handled before the runtime.
        Command::Completions(_) | Command::Man(_) => {}
    }
    Ok(())
}

/// Sends what the probe logs (aya-log records, passed on by `Probe::flush_log`) to stderr, one
/// line each, at the levels `RUST_LOG` picks: `warn` by default (full tables, failed reads),
/// `off` for none, `debug` for everything.
fn init_log() {
    use std::io::Write;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|out, record| {
            let level = record.level().as_str().to_ascii_lowercase();
            writeln!(out, "tracer: probe {level}: {}", record.args())
        })
        .init();
}

/// How long `watch` and `run` have to stop by themselves after SIGINT or SIGTERM (draining,
/// printing their summary) before the process exits anyway, unless they are still reading
/// events.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The longest they are given while they keep reading events: a `watch` that prints what its
/// rings held at the signal took more than `STOP_GRACE` in an emulated guest on a busy host,
/// and lost its summary.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Makes SIGINT and SIGTERM stop tracer within a second in every state that is stuck. The
/// subcommands stop cleanly on their own signal handlers; this thread exits the process, with
/// status 0, if they have not done so `STOP_GRACE` after the signal (or after the last
/// `STOP_GRACE` in which they read events, `STOP_LIMIT` at most): while the probe loads, while
/// a write to a stdout that nobody reads blocks, while a census is under way. Exiting closes
/// the probe's links and maps, which detaches it.
fn stop_on_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // This thread only waits and exits: it keeps no privilege.
            let _ = tracer::privileges::keep_only(&[]);
            if signals.forever().next().is_some() {
                let deadline = std::time::Instant::now() + STOP_LIMIT;
                let mut read = tracer::cmd::progress();
                loop {
                    std::thread::sleep(STOP_GRACE);
                    let now = tracer::cmd::progress();
                    if now == read || std::time::Instant::now() >= deadline {
                        break;
                    }
                    read = now;
                }
                eprintln!("tracer: stopped by signal (it could not stop cleanly in time)");
                std::process::exit(0);
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the signal thread: {e}"))?;
    Ok(())
}
