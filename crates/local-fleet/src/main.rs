//! `local-fleet` (what `make run` starts): check the machine, start the fleet, say where
//! everything listens once a mandelbox can be assigned, and on Ctrl-C stop all of it.

mod fleet;
mod hosts;
mod prerequisites;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use fleet::{FleetOptions, LocalFleet};

/// The whole fleet on this machine: Postgres and the GraphQL engine, the scaling-service, and
/// host-service processes it launches as hosts, each keeping real mandelbox containers.
#[derive(Debug, Parser)]
#[command(name = "local-fleet", version, about)]
struct Args {
    /// Address of the scaling-service's API (assign, json_transport, metrics).
    #[arg(long, default_value = "127.0.0.1:7730")]
    listen: SocketAddr,

    /// Loopback port of the GraphQL engine (the default of every client's --hasura-url).
    #[arg(long, default_value_t = 8080)]
    graphql_port: u16,

    /// Seconds between the engine's re-reads of every live query.
    #[arg(long, default_value_t = 1)]
    refresh_seconds: u64,

    /// The Docker engine's socket.
    #[arg(
        long,
        env = "WHIST_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    docker_socket: PathBuf,

    /// The host-service binary; the one built next to this program by default.
    #[arg(long)]
    host_binary: Option<PathBuf>,

    /// The mandelbox image; the reference mandelbox is built and used by default.
    #[arg(long)]
    mandelbox_image: Option<String>,

    /// Loopback address of the first host; later hosts take the next ones.
    #[arg(long, default_value = "127.0.1.1")]
    first_host_address: Ipv4Addr,

    /// Seconds to wait for the first assignable mandelbox.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = whist_logging::init_from_env() {
        eprintln!("local-fleet: logging: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("local-fleet: start the async runtime: {error}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Prerequisite(error)) => {
            eprintln!("local-fleet: {error:#}");
            ExitCode::from(2)
        }
        Err(Failure::Run(error)) => {
            eprintln!("local-fleet: {error:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// The machine lacks something; nothing was started.
    Prerequisite(anyhow::Error),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Run(error)
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let started = Instant::now();
    let docker = prerequisites::docker(&args.docker_socket)
        .await
        .map_err(Failure::Prerequisite)?;
    prerequisites::free(args.listen, "the scaling-service API", "--listen")
        .and_then(|()| {
            prerequisites::free(
                (Ipv4Addr::LOCALHOST, args.graphql_port).into(),
                "the GraphQL engine",
                "--graphql-port",
            )
        })
        .map_err(Failure::Prerequisite)?;
    let host_binary = match args.host_binary {
        Some(path) => path,
        None => sibling_binary("host-service")?,
    };
    let options = FleetOptions {
        listen: args.listen,
        graphql_port: args.graphql_port,
        refresh_seconds: args.refresh_seconds,
        docker_socket: args.docker_socket,
        host_binary,
        mandelbox_image: args.mandelbox_image,
        first_host_address: args.first_host_address,
        dir: std::env::temp_dir().join(format!("whist-local-fleet-{}", std::process::id())),
    };

    let mut signals = Signals::listen()?;
    let fleet = LocalFleet::start(&options, docker).await?;
    let ready = tokio::select! {
        ready = fleet.wait_until_assignable(Duration::from_secs(args.ready_timeout)) => Some(ready),
        () = signals.received() => None,
    };
    match ready {
        Some(Ok(waiting)) => {
            print_ready(&fleet, started.elapsed(), waiting);
            signals.received().await;
        }
        Some(Err(error)) => tracing::error!("{error:#}"),
        None => {}
    }
    println!("stopping the local fleet");
    let report = fleet.stop().await?;
    println!(
        "stopped: {} host(s) shut down ({}), {} container(s) left, files removed",
        report.hosts.len(),
        report.hosts.join(", "),
        report.containers_left
    );
    Ok(())
}

fn print_ready(fleet: &LocalFleet, elapsed: Duration, waiting: usize) {
    let info = fleet.stack.info();
    let api = fleet.scaling.addr;
    println!(
        "local fleet ready in {:.1} s: {waiting} mandelbox(es) waiting",
        elapsed.as_secs_f64()
    );
    println!("  assign             POST http://{api}/mandelbox/assign");
    println!("  json_transport     PUT  http://{api}/json_transport");
    println!("  scaling metrics    http://{api}/metrics");
    println!(
        "  GraphQL            {} (admin secret {})",
        info.graphql_url, info.admin_secret
    );
    println!("  Postgres           {}", info.database_url);
    println!("  mandelbox image    {}", fleet.mandelbox_image);
    for host in fleet.hosts.hosts() {
        println!(
            "  host {}  {}  metrics {}/metrics  log {}",
            host.cloud.id,
            host.address,
            host.ops_url(),
            host.log_file().display()
        );
    }
    println!("  files and logs     {}", fleet.dir.display());
    let whist = sibling_binary("whist").map_or_else(
        |_| "cargo run -q -p whist-client --".to_owned(),
        |path| path.display().to_string(),
    );
    println!("try, in another terminal:");
    println!("  {whist} session    # assign, send the config, print ports and key, end");
    println!("  {whist} status     # regions, hosts and mandelboxes by state");
    println!("press Ctrl-C to stop");
}

/// A binary built next to this one.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join(name))
        .ok_or_else(|| anyhow::anyhow!("this program's directory is unknown"))?;
    if path.is_file() {
        Ok(path)
    } else {
        anyhow::bail!(
            "{} was not found next to this program; build it (`make run` does) or name it",
            path.display()
        )
    }
}

/// SIGINT and SIGTERM, listened for from the start so an early Ctrl-C still cleans up.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn received(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operations_guide_documents_every_option() {
        whist_test_support::docs::assert_options_documented(
            &<Args as clap::CommandFactory>::command(),
            include_str!("../../../docs/operations.md"),
            false,
        );
    }
}
