//! The fleet controller: keeps a buffer of free sessions per region, launches and drains hosts,
//! upgrades machine images without cutting sessions, and assigns users to hosts.

pub mod algorithm;
pub mod assign;
pub mod config;
pub mod controller;
pub mod executor;
pub mod fleet;
pub mod hosts;
pub mod http;
pub mod leader;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, LiveOptions};

use crate::algorithm::{BufferAlgorithm, ScalingAlgorithm};
use crate::assign::Assigner;
use crate::config::Config;
use crate::controller::Controller;
use crate::executor::Executor;
use crate::fleet::FleetView;
use crate::hosts::HostHandler;
use crate::http::{AppState, RateLimiter};
use crate::metrics::Metrics;

/// A started service.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Whether this replica leads (runs the scaling) now.
    pub leader: watch::Receiver<bool>,
    pub fleet: FleetView,
    shutdown: CancellationToken,
    finished: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn wait(self) {
        let _ = self.finished.await;
    }
}

/// Options tests and benchmarks tune.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub live: Option<LiveOptions>,
    /// Another scaling algorithm than the default buffer one.
    pub algorithm: Option<Arc<dyn ScalingAlgorithm>>,
    /// Fleet settings to decide with instead of `config.settings` (tests and benchmarks that
    /// must not change the shared row).
    pub settings: Option<whist_types::FleetSettings>,
}

/// Starts the API, the fleet view, the leader election and (while leading) the controller.
pub async fn start(
    config: Config,
    hosts: Arc<dyn HostHandler>,
    options: StartOptions,
    shutdown: CancellationToken,
) -> std::io::Result<Running> {
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let db = HasuraClient::new(config.hasura.clone());
    let metrics = Arc::new(Metrics::new());
    let background = CancellationToken::new();
    let fleet = FleetView::start(&db, options.live.unwrap_or_default(), background.clone());
    let leader = if config.api_only {
        watch::channel(false).1
    } else {
        leader::spawn(
            db.clone(),
            config.lease_name.clone(),
            config.replica_id.clone(),
            config.lease,
            metrics.clone(),
            background.clone(),
        )
    };
    let controller = Arc::new(ControllerParts {
        fleet: fleet.clone(),
        algorithm: options
            .algorithm
            .unwrap_or_else(|| Arc::new(BufferAlgorithm::new())),
        executor: Arc::new(Executor {
            db: db.clone(),
            hosts,
            environment: config.environment,
            user_data: config.user_data.clone(),
            metrics: metrics.clone(),
            reconcile_grace: chrono::Duration::from_std(config.reconcile_grace)
                .unwrap_or(chrono::Duration::minutes(2)),
            leading: Some(leader.clone()),
        }),
        config: config.clone(),
        metrics: metrics.clone(),
        settings: options.settings.clone(),
    });
    // Scaling stops before the lease is released, so no other replica starts while this one
    // still finishes an action.
    let scaling_stop = CancellationToken::new();
    let scaling = tokio::spawn(lead_while_elected(
        controller,
        leader.clone(),
        scaling_stop.clone(),
    ));

    let verifier = config
        .auth
        .clone()
        .map(|auth| whist_auth::JwtVerifier::new(auth, reqwest::Client::new()));
    if verifier.is_none() {
        tracing::warn!(
            "no token issuer configured: callers name themselves (local development only)"
        );
    }
    let state = AppState {
        assigner: Assigner::new(db.clone(), fleet.clone(), config.environment),
        fleet: fleet.clone(),
        db,
        verifier,
        metrics,
        limiter: Arc::new(RateLimiter::new(
            config.assign_rate_per_user,
            config.assign_burst_per_user,
        )),
        proxy: http::proxy_client(config.proxy_timeout),
        leader: leader.clone(),
    };
    let router = http::router(state);
    let stop = shutdown.clone();
    let finished = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "API server failed");
        }
        scaling_stop.cancel();
        let _ = scaling.await;
        background.cancel();
        // Give the lease release a moment to reach the database.
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    Ok(Running {
        addr,
        leader,
        fleet,
        shutdown,
        finished,
    })
}

#[derive(Debug)]
struct ControllerParts {
    settings: Option<whist_types::FleetSettings>,
    fleet: FleetView,
    algorithm: Arc<dyn ScalingAlgorithm>,
    executor: Arc<Executor>,
    config: Config,
    metrics: Arc<Metrics>,
}

/// Runs the controller whenever this replica leads, and stops it when leadership is lost.
async fn lead_while_elected(
    parts: Arc<ControllerParts>,
    mut leader: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            // Stopping wins over a lease that is still held, so a stop never starts a term.
            biased;
            () = stop.cancelled() => return,
            changed = leader.wait_for(|leading| *leading) => if changed.is_err() { return },
        }
        tracing::info!("leading: scaling starts");
        let term = stop.child_token();
        let controller = Controller {
            fleet: parts.fleet.clone(),
            algorithm: parts.algorithm.clone(),
            executor: parts.executor.clone(),
            environment: parts.config.environment,
            resync_interval: parts.config.resync_interval,
            metrics: parts.metrics.clone(),
            managed_regions: parts.config.managed_regions.clone(),
            settings: parts.settings.clone(),
        };
        let running = tokio::spawn(controller.run(term.clone()));
        tokio::select! {
            () = stop.cancelled() => {}
            _ = leader.wait_for(|leading| !*leading) => {}
        }
        term.cancel();
        let _ = running.await;
        tracing::info!("no longer leading: scaling stopped");
    }
}
