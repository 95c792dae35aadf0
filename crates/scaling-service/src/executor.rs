//! The executor: the only code that changes the cloud. It carries out the algorithm's actions
//! for one region and reconciles the cloud with the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use whist_dbclient::{DbError, HasuraClient, ops};
use whist_types::{
    Environment, ImageUpgrade, Instance, InstanceStatus, NewInstance, PROVIDER_AWS, UpgradeStatus,
    capacity_of,
};

use crate::algorithm::{Action, DrainReason, ImageRef, LaunchPurpose, TerminateReason};
use crate::fleet::Fleet;
use crate::hosts::{CloudHost, CloudState, HostError, HostHandler, LaunchRequest};
use crate::metrics::Metrics;

/// Tags every launched host carries; reconciliation finds our hosts by the first.
pub mod tags {
    pub const FLEET: &str = "whist:fleet";
    pub const REGION: &str = "whist:region";
    pub const CLIENT_SHA: &str = "whist:client-sha";
    pub const PURPOSE: &str = "whist:purpose";
    pub const NAME: &str = "Name";
}

/// What running a region's actions did, for the controller's cooldowns.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub launched: Vec<Instance>,
    pub drained: u32,
    pub errors: u32,
    /// The image the region was swapped to, if it was.
    pub swapped_to: Option<ImageRef>,
}

#[derive(Debug)]
pub struct Executor {
    pub db: HasuraClient,
    pub hosts: Arc<dyn HostHandler>,
    pub environment: Environment,
    pub user_data: String,
    pub metrics: Arc<Metrics>,
    /// How long a launched host may be missing from the cloud's listings (eventual consistency)
    /// or from the database (between launch and insert) before reconciliation acts on it.
    pub reconcile_grace: chrono::Duration,
    /// Whether this replica still leads; actions stop as soon as it does not.
    pub leading: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Executor {
    /// The fleet tag value: hosts of different environments never see each other.
    pub fn fleet_tag(&self) -> String {
        format!("whist-{}", self.environment)
    }

    pub async fn run(&self, region: &str, actions: Vec<Action>, fleet: &Fleet) -> Outcome {
        let mut outcome = Outcome::default();
        for action in actions {
            if self
                .leading
                .as_ref()
                .is_some_and(|leading| !*leading.borrow())
            {
                tracing::warn!(region, "no longer leading: remaining actions dropped");
                break;
            }
            let result = match &action {
                Action::Launch {
                    image,
                    instance_type,
                    count,
                    purpose,
                } => self
                    .launch(region, image, instance_type, *count, *purpose, fleet)
                    .await
                    .map(|rows| outcome.launched.extend(rows)),
                Action::Drain {
                    instance_id,
                    reason,
                } => self
                    .drain(fleet, instance_id, *reason)
                    .await
                    .map(|drained| {
                        outcome.drained += u32::from(drained);
                    }),
                Action::Terminate {
                    instance_id,
                    reason,
                } => self.terminate(region, instance_id, *reason).await,
                Action::SwapImage { image } => {
                    self.swap(region, image, fleet).await.map(|swapped| {
                        if swapped {
                            outcome.swapped_to = Some(image.clone());
                        }
                    })
                }
                Action::RollBackUpgrade { image } => self.roll_back(region, image, fleet).await,
            };
            if let Err(error) = result {
                outcome.errors += 1;
                self.metrics.error("action");
                tracing::error!(region, ?action, %error, "action failed");
            }
        }
        outcome
    }

    async fn launch(
        &self,
        region: &str,
        image: &ImageRef,
        instance_type: &str,
        count: u32,
        purpose: LaunchPurpose,
        fleet: &Fleet,
    ) -> Result<Vec<Instance>, ActionError> {
        let upgrade = fleet
            .upgrades
            .get(region)
            .filter(|_| purpose == LaunchPurpose::Upgrade);
        // An upgrade's launch has one token for its whole life (fleet, region, image and the
        // upgrade's own creation), so a restart mid-upgrade can never launch its buffer twice;
        // a buffer launch gets a fresh one, reused by retries.
        let client_token = match upgrade {
            Some(upgrade) => token(&format!(
                "{}/upgrade/{region}/{}/{}",
                self.fleet_tag(),
                upgrade.image_id,
                upgrade.created_at.timestamp_micros()
            )),
            None => token(&uuid::Uuid::new_v4().to_string()),
        };
        let purpose_name = match purpose {
            LaunchPurpose::Buffer => "buffer",
            LaunchPurpose::Upgrade => "upgrade",
        };
        let request = LaunchRequest {
            region: region.to_owned(),
            image_id: image.image_id.clone(),
            instance_type: instance_type.to_owned(),
            count,
            client_token,
            user_data: self.user_data.clone(),
            tags: BTreeMap::from([
                (tags::FLEET.to_owned(), self.fleet_tag()),
                (tags::REGION.to_owned(), region.to_owned()),
                (tags::CLIENT_SHA.to_owned(), image.client_sha.clone()),
                (tags::PURPOSE.to_owned(), purpose_name.to_owned()),
                (
                    tags::NAME.to_owned(),
                    format!("whist-{}-{region}-{purpose_name}", self.environment),
                ),
            ]),
        };
        let launched = with_retries(|| self.hosts.launch(&request)).await?;
        tracing::info!(region, count = launched.len(), purpose = purpose_name, image = %image.image_id, "launched hosts");
        // From here on the machines exist: they are reported whatever happens to the rows, so
        // the controller counts them (and the reconciliation records any row that is missing).
        let rows: Vec<NewInstance> = launched
            .iter()
            .map(|host| new_row(host, &image.client_sha))
            .collect();
        let recorded = self.insert_rows(&rows).await;
        self.metrics.launched(region, recorded as u32);
        if let Some(upgrade) = upgrade {
            self.db
                .execute(&ops::transition_upgrade(
                    upgrade,
                    &[UpgradeStatus::Pending],
                    UpgradeStatus::Shielded,
                ))
                .await?;
        }
        Ok(launched
            .iter()
            .map(|host| pending_instance(host, &image.client_sha))
            .collect())
    }

    /// Inserts instance rows one by one, so one already present (an idempotent relaunch, a
    /// reconciliation that got there first) does not keep the others out. Returns how many
    /// were new.
    async fn insert_rows(&self, rows: &[NewInstance]) -> usize {
        let mut inserted = 0;
        for row in rows {
            match self
                .db
                .execute(&ops::insert_instances(std::slice::from_ref(row)))
                .await
            {
                Ok(_) => inserted += 1,
                Err(DbError::ConstraintViolation { .. }) => {}
                Err(error) => {
                    self.metrics.error("record_host");
                    tracing::error!(instance.id = %row.id, %error, "record a launched host");
                }
            }
        }
        inserted
    }

    async fn drain(
        &self,
        fleet: &Fleet,
        instance_id: &str,
        reason: DrainReason,
    ) -> Result<bool, ActionError> {
        let Some(instance) = fleet.instances.iter().find(|i| i.id == instance_id) else {
            return Ok(false);
        };
        // Conditional on the row being idle now: a claim that raced the decision wins.
        let capacity = capacity_of(&instance.instance_type);
        let drained = self
            .db
            .execute(&ops::drain_idle_instance(instance_id, capacity))
            .await?;
        if drained.is_some() {
            tracing::info!(instance.id = instance_id, ?reason, "draining host");
        }
        Ok(drained.is_some())
    }

    async fn terminate(
        &self,
        region: &str,
        instance_id: &str,
        reason: TerminateReason,
    ) -> Result<(), ActionError> {
        let ids = [instance_id.to_owned()];
        with_retries(|| self.hosts.terminate(region, &ids)).await?;
        let deleted = self
            .db
            .execute(&ops::delete_instance_and_mandelboxes(instance_id))
            .await?;
        if deleted {
            let reason = match reason {
                TerminateReason::Drained => "drained",
                TerminateReason::HeartbeatLost => "heartbeat_lost",
                TerminateReason::NeverReady => "never_ready",
            };
            self.metrics.terminated(region, reason);
            tracing::info!(instance.id = instance_id, reason, "terminated host");
        }
        Ok(())
    }

    async fn swap(
        &self,
        region: &str,
        image: &ImageRef,
        fleet: &Fleet,
    ) -> Result<bool, ActionError> {
        let Some(upgrade) = upgrade_for(fleet, region, image) else {
            return Ok(false);
        };
        let swapped = self
            .db
            .execute(&ops::swap_to_upgrade(upgrade))
            .await?
            .is_some();
        if swapped {
            self.metrics.upgrade(region, "swapped");
            tracing::info!(region, image = %image.image_id, "region swapped to its new image");
        }
        Ok(swapped)
    }

    async fn roll_back(
        &self,
        region: &str,
        image: &ImageRef,
        fleet: &Fleet,
    ) -> Result<(), ActionError> {
        let Some(upgrade) = upgrade_for(fleet, region, image) else {
            return Ok(());
        };
        // Claim the rollback first: if the upgrade was swapped meanwhile (another actor, a stale
        // view), its hosts carry sessions now and must not be touched.
        let claimed = self
            .db
            .execute(&ops::transition_upgrade(
                upgrade,
                &[UpgradeStatus::Pending, UpgradeStatus::Shielded],
                UpgradeStatus::RolledBack,
            ))
            .await?;
        if claimed.is_none() {
            return Ok(());
        }
        let ids: Vec<String> = fleet
            .instances_in(region)
            .filter(|i| i.image_id == image.image_id && i.status != InstanceStatus::Active)
            .map(|i| i.id.clone())
            .collect();
        with_retries(|| self.hosts.terminate(region, &ids)).await?;
        for id in &ids {
            if self
                .db
                .execute(&ops::delete_instance_and_mandelboxes(id))
                .await?
            {
                self.metrics.terminated(region, "rolled_back");
            }
        }
        self.metrics.upgrade(region, "rolled_back");
        tracing::error!(region, image = %image.image_id, hosts = ids.len(), "image upgrade rolled back: its hosts never became ACTIVE");
        Ok(())
    }

    /// Makes the cloud and the database agree for `region`: a host of ours the database does not
    /// know is recorded (it was launched and the insert never happened); a row whose machine is
    /// gone is deleted with its mandelboxes.
    pub async fn reconcile(
        &self,
        region: &str,
        fleet: &Fleet,
        now: DateTime<Utc>,
        ready_timeout_seconds: i32,
    ) -> Result<(), ActionError> {
        let fleet_tag = self.fleet_tag();
        let cloud = with_retries(|| self.hosts.list(region, (tags::FLEET, &fleet_tag))).await?;
        let cloud_by_id: HashMap<&str, &CloudHost> =
            cloud.iter().map(|host| (host.id.as_str(), host)).collect();
        let rows: HashSet<&str> = fleet.instances_in(region).map(|i| i.id.as_str()).collect();
        let ready_timeout = chrono::Duration::seconds(i64::from(ready_timeout_seconds.max(0)));

        let (young, old): (Vec<&CloudHost>, Vec<&CloudHost>) = cloud
            .iter()
            .filter(|host| matches!(host.state, CloudState::Pending | CloudState::Running))
            .filter(|host| !rows.contains(host.id.as_str()))
            .filter(|host| {
                host.launched_at
                    .is_none_or(|at| now - at > self.reconcile_grace)
            })
            .partition(|host| host.launched_at.is_some_and(|at| now - at < ready_timeout));
        // Young machines were launched and never recorded: record them, they are booting.
        let unrecorded: Vec<NewInstance> = young
            .iter()
            .map(|host| {
                let client_sha = host.tags.get(tags::CLIENT_SHA).cloned().unwrap_or_default();
                new_row(host, &client_sha)
            })
            .collect();
        if !unrecorded.is_empty() {
            tracing::warn!(
                region,
                count = unrecorded.len(),
                "recording hosts launched but never recorded"
            );
            self.insert_rows(&unrecorded).await;
        }
        // Old ones have no row because their host drained and left: they only cost money.
        let leftovers: Vec<String> = old.iter().map(|host| host.id.clone()).collect();
        if !leftovers.is_empty() {
            tracing::warn!(
                region,
                count = leftovers.len(),
                "terminating hosts without a row"
            );
            with_retries(|| self.hosts.terminate(region, &leftovers)).await?;
            for _ in &leftovers {
                self.metrics.terminated(region, "unrecorded");
            }
        }

        for instance in fleet.instances_in(region) {
            let gone = match cloud_by_id.get(instance.id.as_str()) {
                None => true,
                Some(host) => matches!(
                    host.state,
                    CloudState::Terminated | CloudState::ShuttingDown
                ),
            };
            if gone && now - instance.created_at > self.reconcile_grace {
                let deleted = self
                    .db
                    .execute(&ops::delete_instance_and_mandelboxes(&instance.id))
                    .await?;
                if deleted {
                    tracing::warn!(instance.id = %instance.id, "deleted the row of a host that no longer exists");
                    self.metrics.terminated(region, "vanished");
                }
            }
        }
        Ok(())
    }
}

fn upgrade_for<'a>(fleet: &'a Fleet, region: &str, image: &ImageRef) -> Option<&'a ImageUpgrade> {
    fleet
        .upgrades
        .get(region)
        .filter(|upgrade| upgrade.image_id == image.image_id)
}

fn new_row(host: &CloudHost, client_sha: &str) -> NewInstance {
    NewInstance {
        id: host.id.clone(),
        provider: PROVIDER_AWS.to_owned(),
        region: host.region.clone(),
        image_id: host.image_id.clone(),
        client_sha: client_sha.to_owned(),
        instance_type: host.instance_type.clone(),
        remaining_capacity: capacity_of(&host.instance_type) as i32,
        status: InstanceStatus::PreConnection,
    }
}

/// The row the database will show for a launch, until the live query shows the real one.
fn pending_instance(host: &CloudHost, client_sha: &str) -> Instance {
    let now = Utc::now();
    Instance {
        id: host.id.clone(),
        provider: PROVIDER_AWS.to_owned(),
        region: host.region.clone(),
        image_id: host.image_id.clone(),
        client_sha: client_sha.to_owned(),
        ip_addr: None,
        instance_type: host.instance_type.clone(),
        remaining_capacity: capacity_of(&host.instance_type) as i32,
        status: InstanceStatus::PreConnection,
        created_at: now,
        updated_at: now,
    }
}

/// EC2 client tokens are at most 64 ASCII characters; a digest keeps any key within that.
fn token(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Retries cloud calls that may succeed later (throttling, capacity, transport) with capped,
/// jittered backoff; gives up at once on requests the cloud will never accept.
async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, HostError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, HostError>>,
{
    let mut delay = Duration::from_millis(250);
    for attempt in 1.. {
        match call().await {
            Err(error) if error.is_retryable() && attempt < 4 => {
                tracing::warn!(%error, attempt, "cloud call failed; retrying");
                let jitter = delay.mul_f64(fastrand::f64() * 0.5);
                tokio::time::sleep(delay + jitter).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Cloud(#[from] HostError),
    #[error(transparent)]
    Database(#[from] DbError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_fit_ec2_and_are_stable_per_key() {
        let a = token("upgrade/us-east-1/ami-1");
        assert_eq!(a.len(), 64);
        assert_eq!(a, token("upgrade/us-east-1/ami-1"));
        assert_ne!(a, token("upgrade/us-east-1/ami-2"));
    }
}
