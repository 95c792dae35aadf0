//! The reference mandelbox: a stand-in for the session container image that honours the same
//! in-container contract as the real one (a browser), so host-service can be run and tested
//! against real Docker containers without the real image.
//!
//! In order (each step is in the module named):
//! 1. find the resource directory the host bind-mounts (`contract`);
//! 2. wait for `.paramsReady`, read the start parameters and `WHIST_AES_KEY` (`contract`);
//! 3. listen on the container ports and answer a one-line protocol (`session`);
//! 4. wait for `config.json`, then write the readiness file (`session`, `contract`);
//! 5. end on `END` from a client or when no client comes within the timeout (`session`).
//!
//! Exit codes: 0 normal end, 1 I/O failure (e.g. a port cannot be bound), 2 bad or missing start
//! parameters, 3 `config.json` is not a JSON object.
//!
//! There is no SIGTERM handler: installing one needs `unsafe` or a dependency, and this program
//! has neither. As PID 1 the kernel therefore ignores SIGTERM, so `docker stop` ends a box by
//! SIGKILL after its grace period; hosts should stop boxes with a short grace or `docker kill`.

mod contract;
mod session;
#[cfg(test)]
mod testutil;

use std::env;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use contract::Failure;
use session::{Config, Ended, Session};

fn main() -> ExitCode {
    let dir = env::var_os(contract::RESOURCE_DIR_ENV).map_or_else(
        || PathBuf::from(contract::DEFAULT_RESOURCE_DIR),
        PathBuf::from,
    );
    let aes_key = env::var(contract::AES_KEY_ENV).ok();
    println!(
        "reference-mandelbox: waiting for {} in {}",
        contract::PARAMS_READY,
        dir.display()
    );
    let code = match run(Config::container(dir, aes_key)) {
        Ok(ended) => {
            println!("{ended}");
            0
        }
        Err(failure) => {
            eprintln!("reference-mandelbox: {failure}");
            failure.code
        }
    };
    // Returning from main exits the process under the listener threads; say everything first.
    let _ = std::io::stdout().flush();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(config: Config) -> Result<Ended, Failure> {
    let session = Session::start(config)?;
    println!("{}", session.params());
    println!("{}", session.ports_line());
    session.run()
}
