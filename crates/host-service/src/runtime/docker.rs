//! [`ContainerRuntime`] over the Docker engine API (bollard, unix socket).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, DeviceMapping, EventMessageTypeEnum,
    HostConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, InspectContainerOptions,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::{ContainerEvent, ContainerInfo, ContainerRuntime, ContainerSpec, RuntimeError};

/// Seconds any single engine call may take; container stops add their grace period on top.
const REQUEST_TIMEOUT_SECONDS: u64 = 60;

#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects to the engine at `socket` and agrees on an API version it speaks (hosts may run
    /// an older engine than bollard's default API version).
    pub async fn connect(socket: &Path) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_unix(
            &socket.to_string_lossy(),
            REQUEST_TIMEOUT_SECONDS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|error| RuntimeError::Connect(Box::new(error)))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|error| RuntimeError::Connect(Box::new(error)))?;
        Ok(Self { docker })
    }
}

fn classify(operation: &'static str, target: &str, error: DockerError) -> RuntimeError {
    match error {
        DockerError::DockerResponseServerError {
            status_code: 404, ..
        } if operation == "create" => RuntimeError::ImageMissing(target.to_owned()),
        DockerError::DockerResponseServerError { message, .. } => RuntimeError::Refused {
            operation,
            target: target.to_owned(),
            message,
        },
        other => RuntimeError::Failed {
            operation,
            target: target.to_owned(),
            source: Box::new(other),
        },
    }
}

fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let port_bindings = spec
        .ports
        .all()
        .into_iter()
        .map(|binding| {
            (
                format!("{}/{}", binding.container, binding.protocol.as_str()),
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: Some(binding.host.to_string()),
                }]),
            )
        })
        .collect::<HashMap<_, _>>();
    let exposed_ports = port_bindings.keys().cloned().collect();
    let binds = spec
        .binds
        .iter()
        .map(|bind| {
            let mode = if bind.read_only { "ro" } else { "rw" };
            format!("{}:{}:{mode}", bind.host, bind.container)
        })
        .collect();
    let devices = spec
        .devices
        .iter()
        .map(|path| DeviceMapping {
            path_on_host: Some(path.clone()),
            path_in_container: Some(path.clone()),
            cgroup_permissions: Some("rwm".to_owned()),
        })
        .collect();
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        labels: Some(spec.labels.clone().into_iter().collect()),
        env: Some(spec.env.clone()),
        exposed_ports: Some(exposed_ports),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(true),
        host_config: Some(HostConfig {
            port_bindings: Some(port_bindings),
            binds: Some(binds),
            devices: Some(devices),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(
                spec.capabilities
                    .iter()
                    .map(|&cap| cap.to_owned())
                    .collect(),
            ),
            shm_size: Some(spec.shm_bytes),
            memory: Some(spec.memory_bytes),
            pids_limit: Some(spec.pids_limit),
            cpu_shares: Some(spec.cpu_shares),
            tmpfs: Some(
                spec.tmpfs
                    .iter()
                    .map(|&(path, options)| (path.to_owned(), options.to_owned()))
                    .collect(),
            ),
            security_opt: Some(spec.security_options.clone()),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

impl ContainerRuntime for DockerRuntime {
    fn create(&self, spec: &ContainerSpec) -> BoxFuture<'_, Result<String, RuntimeError>> {
        let body = create_body(spec);
        let name = spec.name.clone();
        let image = spec.image.clone();
        Box::pin(async move {
            let options = CreateContainerOptionsBuilder::new().name(&name).build();
            let response = self
                .docker
                .create_container(Some(options), body)
                .await
                .map_err(|error| classify("create", &image, error))?;
            Ok(response.id)
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.docker
                .start_container(id, None)
                .await
                .map_err(|error| classify("start", id, error))
        })
    }

    fn remove<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
            let stop = StopContainerOptionsBuilder::new().t(seconds).build();
            match self.docker.stop_container(id, Some(stop)).await {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => return Ok(()),
                // 304 (already stopped) and other refusals: removal below forces it anyway.
                Err(error) => tracing::debug!(container.id = id, %error, "stop before removal"),
            }
            let remove = RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build();
            match self.docker.remove_container(id, Some(remove)).await {
                Ok(()) => Ok(()),
                Err(error) if is_not_found(&error) => Ok(()),
                // The engine is already removing it (e.g. a concurrent removal): wait for it.
                Err(DockerError::DockerResponseServerError {
                    status_code: 409, ..
                }) => self.wait_gone(id).await,
                Err(error) => Err(classify("remove", id, error)),
            }
        })
    }

    fn list<'a>(
        &'a self,
        label: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<ContainerInfo>, RuntimeError>> {
        Box::pin(async move {
            let filter = format!("{}={}", label.0, label.1);
            let options = ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&HashMap::from([("label".to_owned(), vec![filter.clone()])]))
                .build();
            let summaries = self
                .docker
                .list_containers(Some(options))
                .await
                .map_err(|error| classify("list", &filter, error))?;
            let mut containers = Vec::with_capacity(summaries.len());
            for summary in summaries {
                let Some(id) = summary.id else { continue };
                // The environment holds the session key, which only an inspect reveals.
                let env = match self
                    .docker
                    .inspect_container(&id, None::<InspectContainerOptions>)
                    .await
                {
                    Ok(details) => details
                        .config
                        .and_then(|config| config.env)
                        .unwrap_or_default(),
                    Err(error) if is_not_found(&error) => continue,
                    Err(error) => return Err(classify("inspect", &id, error)),
                };
                containers.push(ContainerInfo {
                    id,
                    labels: summary.labels.unwrap_or_default().into_iter().collect(),
                    running: matches!(
                        summary.state,
                        Some(
                            ContainerSummaryStateEnum::RUNNING
                                | ContainerSummaryStateEnum::RESTARTING
                        )
                    ),
                    env,
                });
            }
            Ok(containers)
        })
    }

    fn events(
        &self,
        label: (&str, &str),
    ) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("label".to_owned(), vec![format!("{}={}", label.0, label.1)]),
            (
                "event".to_owned(),
                vec!["die".to_owned(), "destroy".to_owned()],
            ),
        ]);
        let options = EventsOptionsBuilder::new().filters(&filters).build();
        self.docker
            .events(Some(options))
            .filter_map(|message| async move {
                match message {
                    Ok(message) => {
                        if message.typ != Some(EventMessageTypeEnum::CONTAINER) {
                            return None;
                        }
                        let actor = message.actor?;
                        let id = actor.id?;
                        match message.action.as_deref()? {
                            "die" => {
                                let exit_code = actor
                                    .attributes
                                    .as_ref()
                                    .and_then(|attributes| attributes.get("exitCode"))
                                    .and_then(|code| code.parse().ok());
                                Some(Ok(ContainerEvent::Died { id, exit_code }))
                            }
                            "destroy" => Some(Ok(ContainerEvent::Destroyed { id })),
                            _ => None,
                        }
                    }
                    Err(error) => Some(Err(classify("events", "stream", error))),
                }
            })
            .boxed()
    }
}

impl DockerRuntime {
    async fn wait_gone(&self, id: &str) -> Result<(), RuntimeError> {
        for _ in 0..100 {
            match self
                .docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
            {
                Err(error) if is_not_found(&error) => return Ok(()),
                Err(error) => return Err(classify("inspect", id, error)),
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Err(RuntimeError::Refused {
            operation: "remove",
            target: id.to_owned(),
            message: "still present 10 s after its removal began".to_owned(),
        })
    }
}
