//! Cloud machines behind the [`HostHandler`] trait: EC2 (`ec2/`, the only module that imports
//! the AWS SDK); the local fleet's host-service processes implement it in `local-fleet`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

#[cfg(any(test, feature = "fake"))]
pub mod conformance;
pub mod ec2;
#[cfg(any(test, feature = "fake"))]
pub mod fake;

/// Hosts to launch in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub region: String,
    pub image_id: String,
    pub instance_type: String,
    pub count: u32,
    /// Idempotency token: a retried launch with the same token never launches twice.
    pub client_token: String,
    /// The boot script, plain text (the handler encodes it as the cloud requires).
    pub user_data: String,
    /// Tags applied at launch, so no machine ever exists untagged.
    pub tags: BTreeMap<String, String>,
}

/// The lifecycle state the cloud reports for a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
    Unknown,
}

/// A machine as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudHost {
    pub id: String,
    pub region: String,
    pub image_id: String,
    pub instance_type: String,
    pub state: CloudState,
    pub tags: BTreeMap<String, String>,
    pub launched_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The cloud asked us to slow down; retried with backoff.
    #[error("throttled by the cloud API: {0}")]
    Throttled(String),
    /// No capacity for this type/zone now; retried, and worth trying another type.
    #[error("insufficient capacity: {0}")]
    InsufficientCapacity(String),
    /// A request the cloud will never accept (bad image, type, parameters, permissions).
    #[error("request refused: {0}")]
    Refused(String),
    /// Waited longer than allowed.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// Transport failures and anything unclassified; retried.
    #[error("cloud API failed: {0}")]
    Failed(String),
}

impl HostError {
    /// The kind, in one word (for logs, labels and tests).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Throttled(_) => "throttled",
            Self::InsufficientCapacity(_) => "capacity",
            Self::Refused(_) => "refused",
            Self::Timeout(..) => "timeout",
            Self::Failed(_) => "failed",
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Throttled(_) | Self::InsufficientCapacity(_) | Self::Failed(_)
        )
    }
}

/// What the cloud answered for each id asked about: the machine, or `None` when the cloud says
/// it does not know that id (EC2's `InvalidInstanceID.NotFound`).
pub type Described = HashMap<String, Option<CloudHost>>;

/// The narrow interface the executor needs from a cloud.
pub trait HostHandler: Send + Sync + std::fmt::Debug + 'static {
    /// Launches `count` machines (all or none where the cloud allows); returns them as launched.
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>>;

    fn terminate<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), HostError>>;

    /// Waits until every machine in `ids` is running.
    fn wait_running<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>>;

    /// Waits until every machine in `ids` is terminated.
    fn wait_terminated<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>>;

    /// Machines in `region` carrying the tag `key=value`, in every state the cloud still reports
    /// (recently terminated ones included). A listing proves nothing about a machine it lacks.
    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>>;

    /// Asks about each machine in `ids` by its id: the positive answer a row's deletion needs.
    /// An id the cloud gave no answer for is left out.
    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>>;
}
