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
pub mod pinned;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, LiveOptions};

use crate::algorithm::{BufferAlgorithm, ScalingAlgorithm};
use crate::assign::Assigner;
use crate::config::Config;
use crate::controller::Controller;
use crate::executor::{Executor, Safety};
use crate::fleet::FleetView;
use crate::hosts::HostHandler;
use crate::http::AppState;
use crate::leader::Term;
use crate::metrics::Metrics;

/// A started service.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Whether this replica leads (runs the scaling) now.
    pub leader: watch::Receiver<bool>,
    /// The current leader term, while this replica leads.
    pub term: watch::Receiver<Option<Term>>,
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
    let (terms, election) = if config.api_only {
        (watch::channel(None).1, None)
    } else {
        let election = leader::spawn(
            db.clone(),
            leader::ElectionOptions {
                name: config.lease_name.clone(),
                replica: config.replica_id.clone(),
                lease: config.lease,
            },
            metrics.clone(),
            background.clone(),
        );
        (election.terms, Some(election.finished))
    };
    let leader = leading(terms.clone());
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
            safety: Safety {
                reconcile_grace: chrono::Duration::from_std(config.reconcile_grace)
                    .unwrap_or(chrono::Duration::minutes(2)),
                max_destroy_share: config.max_destroy_share,
                listing_loss_threshold: config.listing_loss_threshold,
                heartbeat_loss_threshold: config.heartbeat_loss_threshold,
            },
            cloud: config.cloud,
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
        terms.clone(),
        scaling_stop.clone(),
    ));

    let verifier = config
        .auth
        .clone()
        .map(|auth| whist_auth::JwtVerifier::new(auth, reqwest::Client::new()));
    // Keeps the JWKS fresh (so a revoked key stops being trusted) until the service stops.
    if let Some(verifier) = &verifier {
        drop(verifier.spawn_periodic_refresh(background.clone()));
    }
    if verifier.is_none() {
        tracing::warn!(
            "no token issuer configured: callers name themselves (local development only)"
        );
    }
    let state = AppState {
        assigner: Assigner::new(db.clone(), config.environment),
        fleet: fleet.clone(),
        db,
        verifier,
        metrics,
        limiter: Arc::new(whist_serve::PerCallerLimit::new(
            config.assign_rate_per_user,
            config.assign_burst_per_user,
        )),
        proxy: Arc::new(pinned::PinnedClients::new(config.proxy_timeout)),
        leader: leader.clone(),
    };
    let router = whist_serve::bounded(http::router(state), &config.limits);
    let stop = shutdown.clone();
    let limits = config.limits;
    let finished = tokio::spawn(async move {
        // In-flight requests get the longest a request may take to finish.
        let served = whist_serve::serve(listener, router, None, limits, stop, limits.request).await;
        if let Err(error) = served {
            tracing::error!(%error, "API server failed");
        }
        scaling_stop.cancel();
        let _ = scaling.await;
        background.cancel();
        // The election hands the lease back (bounded by a third of a lease), so another
        // replica takes over at once.
        if let Some(election) = election {
            let _ = election.await;
        }
    });
    Ok(Running {
        addr,
        leader,
        term: terms,
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

/// Whether a term is running, as a plain flag for readiness and tests.
fn leading(mut terms: watch::Receiver<Option<Term>>) -> watch::Receiver<bool> {
    let (flag, leading) = watch::channel(terms.borrow().is_some());
    tokio::spawn(async move {
        while terms.changed().await.is_ok() {
            let now = terms.borrow_and_update().is_some();
            flag.send_if_modified(|old| std::mem::replace(old, now) != now);
        }
    });
    leading
}

/// Runs the controller for every term this replica leads, one term at a time.
async fn lead_while_elected(
    parts: Arc<ControllerParts>,
    mut terms: watch::Receiver<Option<Term>>,
    stop: CancellationToken,
) {
    loop {
        let term = tokio::select! {
            // Stopping wins over a term that is still held, so a stop never starts one.
            biased;
            () = stop.cancelled() => return,
            term = terms.wait_for(Option::is_some) => match term {
                Ok(term) => term.clone().expect("waited for a term"),
                Err(_) => return,
            },
        };
        tracing::info!(generation = term.generation(), "leading: scaling starts");
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
        // The controller ends with the term or the stop, after its tasks (bounded by the lease).
        controller.run(term.clone(), stop.clone()).await;
        tracing::info!(generation = term.generation(), "term over: scaling stopped");
        if stop.is_cancelled() {
            return;
        }
        // The next term starts only once this one is over for the election too.
        let _ = terms
            .wait_for(|next| next.as_ref().is_none_or(|next| !next.is(&term)))
            .await;
    }
}
