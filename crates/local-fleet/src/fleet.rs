//! The whole fleet on this machine: the stack, the scaling-service with the local host handler,
//! and the host-service processes it launches.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use host_service::mandelbox::labels;
use host_service::runtime::ContainerRuntime;
use host_service::runtime::docker::DockerRuntime;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, ops};
use whist_test_support::{Stack, StackOptions};
use whist_types::MandelboxStatus;

use crate::hosts::{ExitHook, LocalHosts, LocalHostsOptions};

/// How the local fleet runs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The scaling-service's API.
    pub listen: SocketAddr,
    /// The GraphQL engine's loopback port.
    pub graphql_port: u16,
    /// Seconds between the engine's re-reads of every live query (changes are pushed at once
    /// regardless).
    pub refresh_seconds: u64,
    pub docker_socket: PathBuf,
    /// The host-service binary the hosts run.
    pub host_binary: PathBuf,
    /// The mandelbox image; the reference mandelbox is built when `None`.
    pub mandelbox_image: Option<String>,
    /// The first host's loopback address.
    pub first_host_address: Ipv4Addr,
    /// Where temporary files and logs go (removed on stop).
    pub dir: PathBuf,
}

/// A running local fleet. Call [`LocalFleet::stop`]; dropping it only stops the stack.
#[derive(Debug)]
pub struct LocalFleet {
    pub stack: Stack,
    pub hosts: Arc<LocalHosts>,
    pub scaling: scaling_service::Running,
    pub docker: Arc<DockerRuntime>,
    pub mandelbox_image: String,
    pub dir: PathBuf,
}

/// Seconds a host may drain when the fleet stops before its sessions are stopped.
const HOST_DRAIN_DEADLINE: &str = "10";
/// Seconds a mandelbox gets between SIGTERM and SIGKILL.
const HOST_STOP_GRACE: &str = "2";
/// How long a terminated host may take in all (drain plus stop) before it is killed.
const HOST_STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl LocalFleet {
    /// Starts everything; returns once the scaling-service serves (hosts come after).
    pub async fn start(options: &FleetOptions, docker: DockerRuntime) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.dir)
            .with_context(|| format!("create {}", options.dir.display()))?;
        // Nothing has launched a host before the last step, so a failure leaves only the
        // directory (the stack removes its own).
        let started = Self::start_in_dir(options, docker).await;
        if started.is_err() {
            let _ = remove_dir(&options.dir);
        }
        started
    }

    async fn start_in_dir(options: &FleetOptions, docker: DockerRuntime) -> anyhow::Result<Self> {
        if !options.host_binary.is_file() {
            anyhow::bail!(
                "the host-service binary {} does not exist; build it with `cargo build -p host-service` \
                 (`make run` does) or pass --host-binary",
                options.host_binary.display()
            );
        }
        // The stack and the image are independent and each takes a moment: do both at once.
        let stack_options = StackOptions {
            seed: true,
            engine_port: Some(options.graphql_port),
            subscription_refresh_seconds: options.refresh_seconds,
            ..StackOptions::default()
        };
        let stack = tokio::task::spawn_blocking(move || Stack::start(&stack_options));
        let image = match options.mandelbox_image.clone() {
            Some(image) => image,
            None => tokio::task::spawn_blocking(whist_test_support::reference_mandelbox_image)
                .await?
                .context("build the reference mandelbox image")?,
        };
        let stack = stack.await?.context("start the local stack")?;
        let info = stack.info().clone();

        let docker = Arc::new(docker);
        let sweeper = docker.clone();
        let on_exit: ExitHook = Arc::new(move |instance_id: String| {
            let docker = sweeper.clone();
            async move { remove_containers_of(docker.as_ref(), &instance_id).await }.boxed()
        });
        let hosts = Arc::new(LocalHosts::new(LocalHostsOptions {
            host_binary: options.host_binary.clone(),
            dir: options.dir.join("hosts"),
            host_args: [
                "--environment",
                "local",
                "--hasura-url",
                &info.graphql_url,
                "--hasura-websocket-url",
                &info.websocket_url,
                "--docker-socket",
                &options.docker_socket.to_string_lossy(),
                "--mandelbox-image",
                &image,
                "--drain-deadline",
                HOST_DRAIN_DEADLINE,
                "--stop-grace",
                HOST_STOP_GRACE,
                "--power-off-command",
                "",
            ]
            .map(str::to_owned)
            .to_vec(),
            host_env: vec![
                ("HASURA_ADMIN_SECRET".to_owned(), info.admin_secret.clone()),
                (
                    "RUST_LOG".to_owned(),
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
                ),
            ],
            first_address: options.first_host_address,
            stop_timeout: HOST_STOP_TIMEOUT,
            on_exit: Some(on_exit),
        }));

        let args = <scaling_service::config::Args as clap::Parser>::try_parse_from([
            "scaling-service",
            "--environment",
            "local",
            "--listen",
            &options.listen.to_string(),
            "--hasura-url",
            &info.graphql_url,
            "--hasura-websocket-url",
            &info.websocket_url,
            "--hasura-admin-secret",
            &info.admin_secret,
            // Quicker than production's minute: a developer watches this fleet react.
            "--resync-interval",
            "10",
            "--reconcile-grace",
            "30",
        ])?;
        let config = args.validate()?;
        let scaling = scaling_service::start(
            config,
            hosts.clone(),
            scaling_service::StartOptions::default(),
            CancellationToken::new(),
        )
        .await
        .with_context(|| format!("start the scaling-service on {}", options.listen))?;
        Ok(Self {
            stack,
            hosts,
            scaling,
            docker,
            mandelbox_image: image,
            dir: options.dir.clone(),
        })
    }

    /// A client of the fleet's database.
    pub fn db(&self) -> HasuraClient {
        self.stack.info().client()
    }

    /// Waits until a mandelbox can be assigned: a WAITING row whose container runs. Returns how
    /// many are WAITING then.
    pub async fn wait_until_assignable(&self, timeout: Duration) -> anyhow::Result<usize> {
        let db = self.db();
        let deadline = Instant::now() + timeout;
        loop {
            let waiting: Vec<String> = db
                .execute(&ops::mandelboxes())
                .await?
                .into_iter()
                .filter(|mandelbox| mandelbox.status == MandelboxStatus::Waiting)
                .map(|mandelbox| mandelbox.id.to_string())
                .collect();
            if !waiting.is_empty() {
                let running = self
                    .docker
                    .list((labels::MANAGED_BY, labels::MANAGED_BY_VALUE))
                    .await?
                    .into_iter()
                    .filter(|container| {
                        container.running
                            && container
                                .labels
                                .get(labels::MANDELBOX_ID)
                                .is_some_and(|id| waiting.contains(id))
                    })
                    .count();
                if running > 0 {
                    return Ok(running);
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "no mandelbox became assignable within {timeout:?}; see the logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the scaling-service (so nothing is relaunched), then every host (each drains and
    /// its leftovers are removed), then the stack, and removes the fleet's files.
    pub async fn stop(self) -> anyhow::Result<StopReport> {
        self.scaling.shutdown();
        self.scaling.wait().await;
        let launched = self.hosts.launched_ids();
        // Each host's exit hook has removed its containers by the time this returns; the count
        // below verifies that, by the label each box carries.
        self.hosts.stop_all().await;
        let mut left = 0;
        for id in &launched {
            left += self
                .docker
                .list((labels::INSTANCE_ID, id))
                .await
                .map_or(0, |containers| containers.len());
        }
        drop(self.stack);
        remove_dir(&self.dir)?;
        Ok(StopReport {
            hosts: launched,
            containers_left: left,
        })
    }
}

/// What stopping the fleet found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// Every host the fleet launched.
    pub hosts: Vec<String>,
    pub containers_left: usize,
}

/// Removes every container a host made, as if its machine had vanished.
async fn remove_containers_of(docker: &DockerRuntime, instance_id: &str) {
    let containers = match docker.list((labels::INSTANCE_ID, instance_id)).await {
        Ok(containers) => containers,
        Err(error) => {
            tracing::warn!(instance.id = instance_id, %error, "list a local host's containers");
            return;
        }
    };
    for container in containers {
        if let Err(error) = docker.remove(&container.id, Duration::from_secs(2)).await {
            tracing::warn!(instance.id = instance_id, container = %container.id, %error, "remove a local host's container");
        }
    }
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("remove {}", dir.display())),
    }
}
