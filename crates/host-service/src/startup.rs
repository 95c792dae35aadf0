//! The steps that bring a host up, in the order [`crate::start`] runs them: listeners, identity,
//! Docker, registration, host features and directories, resources, adoption of what an earlier
//! run left, the token verifier. Each either gives what the next needs or the [`Exit`] that
//! says why the host cannot start.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use whist_auth::JwtVerifier;
use whist_dbclient::HasuraClient;
use whist_types::Instance;

use crate::agent::adopt::{self, Adopted};
use crate::config::{Config, IdentitySource};
use crate::mandelbox::spec::HostFeatures;
use crate::metadata::{self, HostIdentity};
use crate::registration::{self, Registration};
use crate::resources::gpus::{GpuSlots, MANDELBOXES_PER_GPU, discover_gpus};
use crate::resources::ports::PortAllocator;
use crate::resources::ttys::TtyAllocator;
use crate::runtime::ContainerRuntime;
use crate::runtime::docker::DockerRuntime;
use crate::{Exit, StartOptions, apparmor, http};

pub(crate) fn failed(message: String) -> Exit {
    Exit::StartupFailed(message)
}

/// Both listeners, bound first so a port in use fails the start before anything else happens.
pub(crate) struct Listeners {
    pub transport: TcpListener,
    pub ops: TcpListener,
    pub transport_addr: SocketAddr,
    pub ops_addr: SocketAddr,
}

impl Listeners {
    pub(crate) async fn bind(config: &Config) -> Result<Self, Exit> {
        let bind = |addr: SocketAddr| async move {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|error| failed(format!("listen on {addr}: {error}")))?;
            let bound = listener.local_addr().map_err(|e| failed(e.to_string()))?;
            Ok::<_, Exit>((listener, bound))
        };
        let (transport, transport_addr) = bind(config.listen).await?;
        let (ops, ops_addr) = bind(config.ops_listen).await?;
        Ok(Self {
            transport,
            ops,
            transport_addr,
            ops_addr,
        })
    }
}

/// Who this host is: from the configuration locally, from the instance metadata on EC2.
pub(crate) async fn identify(config: &Config) -> Result<HostIdentity, Exit> {
    match &config.identity {
        IdentitySource::Local(identity) => Ok(identity.clone()),
        IdentitySource::Imds(endpoint) => metadata::from_imds(endpoint)
            .await
            .map_err(|error| failed(format!("read instance metadata: {error}"))),
    }
}

pub(crate) async fn connect_docker(config: &Config) -> Result<Arc<dyn ContainerRuntime>, Exit> {
    let docker = DockerRuntime::connect(&config.docker_socket)
        .await
        .map_err(|error| {
            failed(format!(
                "connect to Docker at {}: {error}",
                config.docker_socket.display()
            ))
        })?;
    Ok(Arc::new(docker))
}

/// Registers the host against its row, publishing the certificate's fingerprint.
pub(crate) async fn register(
    db: &HasuraClient,
    identity: &HostIdentity,
    config: &Config,
    certificate_der: &[u8],
) -> Result<Registration, Exit> {
    let registration = registration::register_waiting_for_row(
        db,
        identity,
        &config.host_commit,
        &http::tls::fingerprint(certificate_der),
        config.timeouts.registration_wait,
    )
    .await
    .map_err(|error| match error {
        registration::RegistrationError::Database(error) => {
            failed(format!("read the instance row: {error}"))
        }
        other => Exit::RegistrationRefused(other.to_string()),
    })?;
    match &registration {
        Registration::Registered(_) => tracing::info!("registered; instance is ACTIVE"),
        Registration::Resumed(_) => {
            tracing::info!("instance already ACTIVE as this host; resuming")
        }
        Registration::Draining(_) => tracing::info!("instance is DRAINING; draining at once"),
    }
    Ok(registration)
}

/// What this host's kernel offers boxes; AppArmor only if its profile loads.
pub(crate) async fn host_features() -> HostFeatures {
    let features = HostFeatures::detect();
    if !features.apparmor {
        return features;
    }
    match apparmor::load_profile().await {
        Ok(()) => features,
        Err(error) => {
            tracing::warn!(%error, "AppArmor profile not loaded; mandelboxes run without it");
            HostFeatures {
                apparmor: false,
                ..features
            }
        }
    }
}

pub(crate) fn create_directories(config: &Config) -> Result<(), Exit> {
    for dir in [&config.mandelbox.whist_dir, &config.mandelbox.temp_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|error| failed(format!("create {}: {error}", dir.display())))?;
    }
    Ok(())
}

/// What boxes are given: host ports, TTYs, GPU slots.
pub(crate) struct Resources {
    pub ports: PortAllocator,
    pub ttys: TtyAllocator,
    pub gpus: GpuSlots,
}

impl Resources {
    pub(crate) fn new(config: &Config, options: &StartOptions) -> Self {
        let gpus = options
            .gpus
            .clone()
            .unwrap_or_else(|| discover_gpus(config.gpu));
        Self {
            ports: PortAllocator::new(
                PortAllocator::default_range(),
                [config.listen.port(), config.ops_listen.port()],
            ),
            ttys: TtyAllocator::default(),
            gpus: GpuSlots::for_gpus(gpus.gpus(), MANDELBOXES_PER_GPU),
        }
    }
}

/// Takes over the boxes an earlier run left that still have a live row, and their resources;
/// removes everything else it left (see [`adopt`]).
pub(crate) async fn adopt(
    db: &HasuraClient,
    runtime: &dyn ContainerRuntime,
    instance: &Instance,
    config: &Config,
    resources: &mut Resources,
) -> Result<Vec<Adopted>, Exit> {
    let adopted = adopt::reconcile(
        db,
        runtime,
        &instance.id,
        &config.mandelbox,
        adopt::Allocators {
            ports: &mut resources.ports,
            ttys: &mut resources.ttys,
            gpus: &mut resources.gpus,
        },
        config.timeouts.stop_grace,
    )
    .await
    .map_err(|error| failed(format!("reconcile with an earlier run: {error}")))?;
    if !adopted.is_empty() {
        tracing::info!(
            count = adopted.len(),
            "adopted mandelboxes of an earlier run"
        );
    }
    Ok(adopted)
}

/// The `json_transport` caller check, when an issuer is configured.
pub(crate) fn verifier(config: &Config) -> Option<JwtVerifier> {
    let verifier = config
        .auth
        .clone()
        .map(|auth| JwtVerifier::new(auth, reqwest::Client::new()));
    if verifier.is_none() {
        tracing::warn!("no token issuer configured: json_transport does not check callers");
    }
    verifier
}

/// The names clients may reach the TLS endpoint by.
pub(crate) fn subject_alt_names(identity: &HostIdentity) -> Vec<String> {
    let mut names = vec![
        identity.public_ip.to_string(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        "localhost".to_owned(),
    ];
    names.dedup();
    names
}
