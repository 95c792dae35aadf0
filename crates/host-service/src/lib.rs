//! The per-host agent: registers the host, keeps pre-warmed mandelboxes, runs sessions and drains.
//!
//! [`start`] brings the service up in order (listeners, identity, registration, resources,
//! adoption of what an earlier run left: the steps in `startup.rs`, then the [`agent`] and the
//! servers) and returns a [`Running`] service; its
//! [`Running::wait`] resolves after the drain with the [`Exit`] to report. `main.rs` only parses
//! configuration, wires signals to the shutdown token and turns the `Exit` into a process code.

pub mod agent;
pub mod apparmor;
pub mod config;
pub mod heartbeat;
pub mod http;
pub mod mandelbox;
pub mod metadata;
pub mod metrics;
pub mod registration;
pub mod resources;
pub mod runtime;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use whist_dbclient::{HasuraClient, LiveOptions};

use crate::agent::{AgentParts, DrainReport};
use crate::config::Config;
use crate::http::routes::{AppState, ops_router, transport_router};
use crate::metadata::HostIdentity;
use crate::metrics::Metrics;
use crate::registration::Registration;

/// How the process ends; each has its own exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Drained: no sessions left, row deleted.
    Drained,
    /// Drained, but the deadline passed and live sessions were stopped.
    DrainForced,
    /// Could not start (metadata, database, Docker, listeners).
    StartupFailed(String),
    /// The instance row does not describe this host.
    RegistrationRefused(String),
    /// Drained, but the instance row could not be deleted.
    RowNotDeleted,
}

impl Exit {
    /// 0 success; 2 is clap's code for bad arguments; the rest say what went wrong.
    pub fn code(&self) -> u8 {
        match self {
            Self::Drained => 0,
            Self::StartupFailed(_) => 3,
            Self::RegistrationRefused(_) => 4,
            Self::DrainForced => 5,
            Self::RowNotDeleted => 6,
        }
    }
}

/// A started service.
#[derive(Debug)]
pub struct Running {
    pub identity: HostIdentity,
    /// Where `json_transport` is served (TLS).
    pub transport_addr: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (plain HTTP).
    pub ops_addr: SocketAddr,
    /// The self-signed certificate of the TLS listener (DER), for callers that pin it.
    pub certificate_der: Vec<u8>,
    pub agent: agent::AgentHandle,
    shutdown: CancellationToken,
    finished: tokio::task::JoinHandle<Exit>,
}

impl Running {
    /// Begins a drain, as SIGTERM does.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the service to end.
    pub async fn wait(self) -> Exit {
        self.finished
            .await
            .unwrap_or_else(|error| Exit::StartupFailed(format!("service task failed: {error}")))
    }
}

/// Options tests and benchmarks tune; production uses the defaults.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub live: Option<LiveOptions>,
    /// GPUs to assume instead of asking NVML (tests use several fake ones).
    pub gpus: Option<Arc<dyn resources::gpus::GpuInventory>>,
}

/// Starts the service. `shutdown` begins a drain when cancelled.
///
/// Each step of the way up is a function of [`startup`], in the order they run here; what is
/// left in this function is the wiring of what they made.
pub async fn start(
    config: Config,
    options: StartOptions,
    shutdown: CancellationToken,
) -> Result<Running, Exit> {
    let config = Arc::new(config);
    let listeners = startup::Listeners::bind(&config).await?;
    let identity = startup::identify(&config).await?;
    let span = tracing::info_span!("host", instance.id = %identity.instance_id);
    tracing::info!(
        instance.name = identity.name.as_deref().unwrap_or("-"),
        instance.r#type = %identity.instance_type,
        region = %identity.region,
        commit = %config.host_commit,
        "starting"
    );

    let db = HasuraClient::new(config.hasura.clone());
    let runtime = startup::connect_docker(&config).await?;
    // The certificate comes first: registration publishes its fingerprint, the only one the
    // scaling-service's proxy will accept from this host.
    let tls = http::tls::self_signed(&startup::subject_alt_names(&identity))
        .map_err(|error| startup::failed(format!("make the TLS certificate: {error}")))?;
    let registration = startup::register(&db, &identity, &config, &tls.certificate_der).await?;
    let features = startup::host_features().await;
    startup::create_directories(&config)?;
    let mut resources = startup::Resources::new(&config, &options);
    let instance = registration.instance().clone();
    let adopted = startup::adopt(&db, runtime.as_ref(), &instance, &config, &mut resources).await?;
    let verifier = startup::verifier(&config);

    let metrics = Arc::new(Metrics::new());
    let agent_shutdown = shutdown.child_token();
    let entered = span.enter();
    let (agent, agent_task) = agent::spawn(
        AgentParts {
            config: config.clone(),
            draining: matches!(registration, Registration::Draining(_)),
            instance,
            db: db.clone(),
            runtime,
            features,
            ports: resources.ports,
            ttys: resources.ttys,
            gpus: resources.gpus,
            metrics: metrics.clone(),
            adopted,
            live_options: options.live.unwrap_or_default(),
        },
        agent_shutdown,
    );
    drop(entered);

    let servers_stop = CancellationToken::new();
    let state = AppState {
        agent: agent.clone(),
        verifier: verifier.clone(),
        metrics,
        allowance: Arc::new(whist_serve::PerCallerLimit::new(
            config.transport_allowance.0,
            config.transport_allowance.1,
        )),
    };
    let (transport_addr, ops_addr) = (listeners.transport_addr, listeners.ops_addr);
    let transport_server = tokio::spawn(http::tls::serve_tls(
        listeners.transport,
        tls.server_config.clone(),
        transport_router(state.clone()),
        config.limits,
        servers_stop.clone(),
        Duration::from_secs(5),
    ));
    let ops_server = tokio::spawn(serve_plain(
        listeners.ops,
        ops_router(state),
        config.limits,
        servers_stop.clone(),
    ));
    let heartbeat_stop = CancellationToken::new();
    tokio::spawn(heartbeat::run(
        db,
        identity.instance_id.clone(),
        config.timeouts.heartbeat_interval,
        heartbeat_stop.clone(),
    ));
    let jwks_refresh = verifier
        .as_ref()
        .map(|verifier| verifier.spawn_periodic_refresh(servers_stop.clone()));

    let finished = tokio::spawn(
        async move {
            let report = agent_task.await.unwrap_or(DrainReport {
                forced: true,
                row_deleted: false,
                requested_by_fleet: false,
            });
            heartbeat_stop.cancel();
            servers_stop.cancel();
            let _ = transport_server.await;
            let _ = ops_server.await;
            if let Some(refresh) = jwks_refresh {
                let _ = refresh.await;
            }
            tracing::info!(?report, "drained");
            if let Some(command) = &config.power_off_command {
                power_off(command).await;
            }
            if !report.row_deleted {
                Exit::RowNotDeleted
            } else if report.forced {
                Exit::DrainForced
            } else {
                Exit::Drained
            }
        }
        .instrument(span),
    );

    Ok(Running {
        identity,
        transport_addr,
        ops_addr,
        certificate_der: tls.certificate_der,
        agent,
        shutdown,
        finished,
    })
}

async fn serve_plain(
    listener: TcpListener,
    router: axum::Router,
    limits: whist_serve::Limits,
    stop: CancellationToken,
) {
    let router = whist_serve::bounded(router, &limits);
    let served = whist_serve::serve(listener, router, None, limits, stop, Duration::from_secs(1));
    if let Err(error) = served.await {
        tracing::error!(%error, "operations endpoint failed");
    }
}

async fn power_off(command: &[String]) {
    let Some((program, args)) = command.split_first() else {
        return;
    };
    tracing::info!(command = %command.join(" "), "powering off");
    match tokio::process::Command::new(program)
        .args(args)
        .status()
        .await
    {
        Ok(status) if status.success() => {}
        Ok(status) => tracing::error!(%status, "power-off command failed"),
        Err(error) => tracing::error!(%error, "power-off command could not run"),
    }
}
