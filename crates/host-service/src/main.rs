//! host-service: parse configuration, start logging, run until drained, exit with a code that
//! says how it ended (see [`host_service::Exit::code`]).

use std::process::ExitCode;

use clap::Parser;
use host_service::config::Args;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = whist_logging::init_from_env() {
        eprintln!("host-service: logging: {error}");
        return ExitCode::from(2);
    }
    let config = match args.validate() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "start the async runtime");
            return ExitCode::from(3);
        }
    };
    let exit = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(drain_on_signal(shutdown.clone()));
        match host_service::start(config, Default::default(), shutdown).await {
            Ok(running) => running.wait().await,
            Err(exit) => exit,
        }
    });
    match &exit {
        host_service::Exit::Drained => tracing::info!("exiting"),
        other => tracing::error!(exit = ?other, "exiting"),
    }
    ExitCode::from(exit.code())
}

/// SIGTERM or SIGINT begins a drain; the drain's own deadline bounds how long it takes.
async fn drain_on_signal(shutdown: CancellationToken) {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        tracing::error!("cannot listen for SIGTERM");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
    shutdown.cancel();
}
