//! The container runtime as the agent sees it: domain types in and out, no Docker types.
//!
//! [`docker::DockerRuntime`] is the implementation (bollard over the engine's unix socket); it is
//! the only module that imports bollard. [`fake::FakeRuntime`] is an in-memory engine for tests,
//! held to the same [`conformance`] cases as Docker.

#[cfg(any(test, feature = "fake"))]
pub mod conformance;
pub mod docker;
#[cfg(any(test, feature = "fake"))]
pub mod fake;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::resources::HostPorts;

/// Everything needed to create one mandelbox container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub env: Vec<String>,
    pub ports: HostPorts,
    pub binds: Vec<Bind>,
    pub devices: Vec<String>,
    pub capabilities: Vec<&'static str>,
    pub memory_bytes: i64,
    pub shm_bytes: i64,
    pub pids_limit: i64,
    pub cpu_shares: i64,
    pub tmpfs: Vec<(&'static str, &'static str)>,
    pub security_options: Vec<String>,
}

/// A host path mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: String,
    pub container: String,
    pub read_only: bool,
}

/// A container the runtime reports, as far as the agent cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    pub env: Vec<String>,
}

impl ContainerInfo {
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|entry| {
            entry
                .split_once('=')
                .filter(|(key, _)| *key == name)
                .map(|(_, value)| value)
        })
    }
}

/// A change in a container's life that the agent reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerEvent {
    /// The container's main process exited (or was killed).
    Died { id: String, exit_code: Option<i64> },
    /// The container no longer exists.
    Destroyed { id: String },
}

impl ContainerEvent {
    pub fn container_id(&self) -> &str {
        match self {
            Self::Died { id, .. } | Self::Destroyed { id } => id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot reach the container engine")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("container engine refused {operation} of {target}: {message}")]
    Refused {
        operation: &'static str,
        target: String,
        message: String,
    },
    #[error("container engine failed {operation} of {target}")]
    Failed {
        operation: &'static str,
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("image {0} is not present on this host")]
    ImageMissing(String),
}

/// The narrow interface the agent needs from a container engine.
pub trait ContainerRuntime: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a container; returns its id. Nothing runs yet.
    fn create(&self, spec: &ContainerSpec) -> BoxFuture<'_, Result<String, RuntimeError>>;

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Stops (SIGTERM, then SIGKILL after `grace`) and removes the container; succeeds when the
    /// container is gone, including when it was gone already.
    fn remove<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Containers, running or not, carrying the label `key=value`.
    fn list<'a>(
        &'a self,
        label: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<ContainerInfo>, RuntimeError>>;

    /// Lifecycle events of containers carrying the label `key=value`. The stream ends or errors
    /// when the connection to the engine breaks; callers reopen it (and resync, since events may
    /// have been missed meanwhile).
    fn events(
        &self,
        label: (&str, &str),
    ) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>>;
}
