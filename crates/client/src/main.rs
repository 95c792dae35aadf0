//! `whist`: plays the client app against a deployment (`whist session`) and shows the fleet's
//! state (`whist status`). The defaults point at the local fleet that `make run` starts.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use url::Url;
use whist_client::session::{self, Client, Identity, SessionOptions};
use whist_client::status::FleetStatus;
use whist_dbclient::{HasuraClient, HasuraConfig};

#[derive(Debug, Parser)]
#[command(name = "whist", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Assign a mandelbox, send it the config through json_transport, print its ports and key,
    /// then end the session.
    Session(SessionArgs),
    /// Show regions, hosts and mandelboxes by state.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct SessionArgs {
    /// The scaling-service's base URL.
    #[arg(
        long,
        env = "WHIST_SCALING_URL",
        default_value = "http://127.0.0.1:7730"
    )]
    scaling_url: Url,

    /// A region to be placed in; repeat it in order of preference.
    #[arg(long = "region", default_value = "us-east-1")]
    regions: Vec<String>,

    /// The user's access token (deployments that check tokens).
    #[arg(
        long,
        env = "WHIST_TOKEN",
        hide_env_values = true,
        conflicts_with = "user"
    )]
    token: Option<String>,

    /// The user id, for deployments that run without token checks (the local fleet).
    #[arg(long, env = "WHIST_USER")]
    user: Option<String>,

    /// The client build's commit; only hosts pinned to it are assigned.
    #[arg(long, env = "WHIST_CLIENT_COMMIT", default_value = "local_dev")]
    commit: String,

    /// The configuration sent to the mandelbox (JSON).
    #[arg(
        long,
        default_value = r#"{"dark_mode":false,"desired_timezone":"Etc/UTC"}"#
    )]
    config: String,

    /// Seconds to keep the session open before ending it.
    #[arg(long, default_value_t = 0)]
    hold: u64,

    /// Leave the session running instead of ending it.
    #[arg(long)]
    keep: bool,

    /// Seconds one request may take (json_transport waits for the mandelbox to be ready).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The GraphQL engine's HTTP endpoint.
    #[arg(
        long,
        env = "HASURA_URL",
        default_value = "http://127.0.0.1:8080/v1/graphql"
    )]
    hasura_url: Url,

    /// The engine's admin secret (the local fleet's by default).
    #[arg(
        long,
        env = "HASURA_ADMIN_SECRET",
        hide_env_values = true,
        default_value = "local-admin-secret"
    )]
    hasura_admin_secret: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("whist: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Session(args) => run_session(args).await,
            Command::Status(args) => show_status(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("whist: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_session(args: SessionArgs) -> anyhow::Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&args.config).context("--config is not JSON")?;
    let identity = match (args.token, args.user) {
        (Some(token), _) => Identity::Token(token),
        (None, Some(user)) => Identity::User(user),
        (None, None) => Identity::User(format!(
            "{}@local",
            std::env::var("USER").unwrap_or_else(|_| "developer".to_owned())
        )),
    };
    let client = Client::new(SessionOptions {
        scaling_url: args.scaling_url,
        identity,
        regions: args.regions,
        client_commit: args.commit,
        config,
        timeout: Duration::from_secs(args.timeout),
    })?;
    let ready = client.start_session().await?;
    let ports = &ready.ports;
    println!("mandelbox  {}", ready.assignment.mandelbox_id);
    println!("host       {}", ready.assignment.ip);
    println!(
        "ports      32261/tcp → {}  32262/tcp → {}  32263/udp → {}  32273/tcp → {}",
        ports.port_32261, ports.port_32262, ports.port_32263, ports.port_32273
    );
    println!("aes key    {}", ports.aes_key);
    println!(
        "timing     assign {:.1} ms, json_transport {:.1} ms",
        ready.assign_time.as_secs_f64() * 1e3,
        ready.transport_time.as_secs_f64() * 1e3
    );
    println!("mandelbox says: {}", session::probe(&ready).await?);
    if args.keep {
        println!("session left running");
        return Ok(());
    }
    if args.hold > 0 {
        println!("holding the session for {} s", args.hold);
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    session::end(&ready, Duration::from_secs(30)).await?;
    println!("session ended");
    Ok(())
}

async fn show_status(args: StatusArgs) -> anyhow::Result<()> {
    let db = HasuraClient::new(HasuraConfig::new(
        args.hasura_url.clone(),
        Some(args.hasura_admin_secret),
    ));
    let status = FleetStatus::read(&db)
        .await
        .with_context(|| format!("read the fleet from {}", args.hasura_url))?;
    print!("{status}");
    Ok(())
}
