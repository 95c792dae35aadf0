//! `stack`: runs the local stack for a person or around a command.
//!
//! - `stack up [--seed]` starts it, prints the URLs, and runs until Ctrl-C.
//! - `stack exec -- CMD ARGS…` starts it, runs CMD with the `WHIST_STACK_*` variables set (the
//!   tests then share this one stack), stops it, and exits with CMD's status.

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};
use whist_test_support::{Stack, StackOptions};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("stack: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = args.split_first().context(USAGE)?;
    let mut options = StackOptions::default();
    match mode.as_str() {
        "up" => {
            options.seed = rest.iter().any(|arg| arg == "--seed");
            let started = Instant::now();
            let stack = Stack::start(&options)?;
            let info = stack.info();
            println!(
                "local stack ready in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            println!("  GraphQL (HTTP)       {}", info.graphql_url);
            println!("  GraphQL (websocket)  {}", info.websocket_url);
            println!("  admin secret         {}", info.admin_secret);
            println!("  Postgres             {}", info.database_url);
            println!("  files and logs       {}", stack.dir().display());
            println!("press Ctrl-C to stop");
            wait_for_interrupt()?;
            println!("stopping");
            Ok(ExitCode::SUCCESS)
        }
        "exec" => {
            let command = match rest.first().map(String::as_str) {
                Some("--") => &rest[1..],
                _ => rest,
            };
            let (program, program_args) = command.split_first().context(USAGE)?;
            let stack = Stack::start(&options)?;
            let status = Command::new(program)
                .args(program_args)
                .envs(stack.info().env())
                .status()
                .with_context(|| format!("run {program}"))?;
            drop(stack);
            Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ))
        }
        other => bail!("unknown mode {other:?}\n{USAGE}"),
    }
}

const USAGE: &str = "usage: stack up [--seed] | stack exec -- COMMAND [ARGS...]";

/// Blocks until SIGINT or SIGTERM.
fn wait_for_interrupt() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("block signals")?;
    signals.wait().context("wait for a signal")?;
    Ok(())
}
