//! scaling-service: parse configuration, start logging, serve and scale until SIGTERM, then stop
//! accepting, finish in-flight requests and hand the leader lease back.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use scaling_service::config::Args;
use scaling_service::hosts::ec2::{Ec2Hosts, Ec2Options};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = whist_logging::init_from_env() {
        eprintln!("scaling-service: logging: {error}");
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
    runtime.block_on(async move {
        let hosts = Arc::new(Ec2Hosts::new(Ec2Options {
            endpoint_url: config.ec2_endpoint.clone(),
            subnet_id: config.ec2_subnet.clone(),
            security_group_ids: config.ec2_security_groups.clone(),
            instance_profile_arn: config.ec2_instance_profile.clone(),
            call_attempts: config.cloud.call_attempts,
            ..Ec2Options::default()
        }));
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match scaling_service::start(config, hosts, Default::default(), shutdown).await {
            Ok(running) => {
                tracing::info!(addr = %running.addr, "serving");
                running.wait().await;
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(%error, "start");
                ExitCode::from(3)
            }
        }
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        tracing::error!("cannot listen for SIGTERM");
        return;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}
