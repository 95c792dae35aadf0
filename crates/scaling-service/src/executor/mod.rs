//! The executor: the only code that changes the cloud. It carries out the algorithm's actions
//! for one region and reconciles the cloud with the database.
//!
//! What keeps it from destroying a fleet:
//! - **Its own fleet only.** It launches with the fleet's tag, records the fleet on the rows,
//!   and drains, terminates and deletes only rows of that fleet (the conditions are in the
//!   mutations themselves).
//! - **Proof for every deletion.** A row is deleted because its machine is gone only when the
//!   cloud, asked about that id, says terminated or unknown, and has said so for longer than
//!   the grace, counted from when it was first seen so. A tag listing never proves anything.
//! - **Suspicious listings pause.** A listing that is empty while rows exist, that lacks more
//!   than a threshold of the rows, or whose running machines mostly lack rows, pauses
//!   everything destructive in the region (and the controller reaps no host when most of a
//!   region's hosts fall silent at once, see [`hold_back_mass_silence`]).
//! - **A budget per pass.** One pass terminates or deletes at most a share of a region's hosts.
//! - **One leader.** Every write is fenced by the term's lease generation; every cloud call is
//!   made only while the term is valid and is cancelled when it ends, under one deadline per
//!   action (the host handler owns the one retry policy).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use whist_dbclient::{DbError, HasuraClient, Operation, ops};
use whist_types::{
    Environment, ImageUpgrade, Instance, InstanceStatus, NewInstance, PROVIDER_AWS, UpgradeStatus,
    capacity_of,
};

use crate::algorithm::{
    Action, DrainReason, ImageRef, LaunchPurpose, RegionSnapshot, TerminateReason,
};
use crate::config::CloudBudget;
use crate::fleet::Fleet;
use crate::hosts::{CloudHost, CloudState, HostError, HostHandler, LaunchRequest};
use crate::leader::{Term, TermEnded};
use crate::metrics::Metrics;

/// Tags every launched host carries; reconciliation finds our hosts by the first.
pub mod tags {
    pub const FLEET: &str = "whist:fleet";
    pub const REGION: &str = "whist:region";
    pub const CLIENT_SHA: &str = "whist:client-sha";
    pub const PURPOSE: &str = "whist:purpose";
    /// The leader term that launched it (its lease generation), for audits.
    pub const TERM: &str = "whist:lease-generation";
    pub const NAME: &str = "Name";
}

/// The fleet of an environment: the `whist:fleet` tag of its machines and the `fleet` column of
/// its rows. Fleets of different environments never touch each other's hosts.
pub fn fleet_name(environment: Environment) -> String {
    format!("whist-{environment}")
}

/// What running a region's actions did, for the controller's cooldowns.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub launched: Vec<Instance>,
    pub drained: u32,
    pub errors: u32,
    /// The image the region was swapped to, if it was.
    pub swapped_to: Option<ImageRef>,
    /// Instance types the cloud had no capacity for, so the next decision tries another.
    pub short_of: Vec<String>,
    /// Terminations left for a later pass by the per-pass budget.
    pub deferred: u32,
}

/// The limits on destruction (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct Safety {
    /// How long a machine must have been reported gone before its row is deleted; also how
    /// long a launched machine may lack a row before it is recorded.
    pub reconcile_grace: chrono::Duration,
    /// The share of a region's hosts one pass may terminate or delete (at least one).
    pub max_destroy_share: f64,
    /// The share of a region's rows a listing may lack before it is distrusted (and the share
    /// of its running machines that may lack a row).
    pub listing_loss_threshold: f64,
    /// The share of a region's hosts that may fall silent at once and still be reaped.
    pub heartbeat_loss_threshold: f64,
}

impl Default for Safety {
    fn default() -> Self {
        Self {
            reconcile_grace: chrono::Duration::minutes(2),
            max_destroy_share: 0.1,
            listing_loss_threshold: 0.5,
            heartbeat_loss_threshold: 0.5,
        }
    }
}

#[derive(Debug)]
pub struct Executor {
    pub db: HasuraClient,
    pub hosts: Arc<dyn HostHandler>,
    pub environment: Environment,
    pub user_data: String,
    pub metrics: Arc<Metrics>,
    pub safety: Safety,
    pub cloud: CloudBudget,
}

/// How many hosts one pass may still destroy.
#[derive(Debug)]
struct Budget(u32);

impl Budget {
    fn for_region(safety: &Safety, hosts: usize) -> Self {
        let share = (hosts as f64 * safety.max_destroy_share).floor() as u32;
        Self(share.max(1))
    }

    fn take(&mut self) -> bool {
        let left = self.0 > 0;
        self.0 = self.0.saturating_sub(1);
        left
    }
}

/// Why reconciliation distrusted the cloud's listing of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// Nothing listed while the region has rows of this fleet.
    EmptyListing,
    /// More than the threshold of the rows missing from the listing.
    LostRows { missing: usize, rows: usize },
    /// More than the threshold of the fleet's running machines have no row (the database lost
    /// rows: a restore, an operator's delete), so they look like leftovers.
    UnrecordedMachines { unrecorded: usize, machines: usize },
}

impl Suspicion {
    pub fn label(self) -> &'static str {
        match self {
            Self::EmptyListing => "empty_listing",
            Self::LostRows { .. } => "lost_rows",
            Self::UnrecordedMachines { .. } => "unrecorded_machines",
        }
    }

    /// Every label, for the metric that says which pause is on.
    pub const LABELS: [&'static str; 3] = ["empty_listing", "lost_rows", "unrecorded_machines"];
}

/// What one reconciliation of a region did and must remember.
#[derive(Debug, Default, Clone)]
pub struct Reconciled {
    /// Machines recorded because they had no row (the live query shows them later).
    pub recorded: Vec<Instance>,
    /// Since when each row's machine has been reported gone (the grace counts from there).
    pub gone_since: HashMap<String, DateTime<Utc>>,
    /// Set when the listing was distrusted and nothing destructive was done.
    pub paused: Option<Suspicion>,
    pub deleted: u32,
    pub deferred: u32,
}

impl Executor {
    /// The fleet tag value: hosts of different environments never see each other.
    pub fn fleet_tag(&self) -> String {
        fleet_name(self.environment)
    }

    pub async fn run(
        &self,
        term: &Term,
        region: &str,
        actions: Vec<Action>,
        fleet: &Fleet,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let mut budget = Budget::for_region(&self.safety, self.own_rows(fleet, region).count());
        for action in actions {
            if !term.is_valid() {
                tracing::warn!(region, "the leader term ended: remaining actions dropped");
                break;
            }
            let result = match &action {
                Action::Launch {
                    image,
                    instance_type,
                    count,
                    purpose,
                } => self
                    .launch(term, region, image, instance_type, *count, *purpose, fleet)
                    .await
                    .map(|rows| outcome.launched.extend(rows)),
                Action::Drain {
                    instance_id,
                    reason,
                } => self
                    .drain(term, fleet, instance_id, *reason)
                    .await
                    .map(|drained| {
                        outcome.drained += u32::from(drained);
                    }),
                Action::Terminate {
                    instance_id,
                    reason,
                } => {
                    if budget.take() {
                        self.terminate(term, region, fleet, instance_id, *reason)
                            .await
                    } else {
                        outcome.deferred += 1;
                        self.metrics.deferred(region);
                        Ok(())
                    }
                }
                Action::SwapImage { image } => {
                    self.swap(term, region, image, fleet).await.map(|swapped| {
                        if swapped {
                            outcome.swapped_to = Some(image.clone());
                        }
                    })
                }
                Action::RollBackUpgrade { image } => {
                    self.roll_back(term, region, image, fleet, &mut budget)
                        .await
                }
            };
            match result {
                Ok(()) => {}
                Err(ActionError::TermEnded) => {
                    tracing::warn!(region, ?action, "the leader term ended during the action");
                    break;
                }
                Err(error) => {
                    outcome.errors += 1;
                    self.metrics.error("action");
                    if let (
                        Action::Launch { instance_type, .. },
                        ActionError::Cloud(HostError::InsufficientCapacity(_)),
                    ) = (&action, &error)
                    {
                        outcome.short_of.push(instance_type.clone());
                    }
                    if matches!(error, ActionError::Database(DbError::Fenced { .. })) {
                        self.metrics.error("fenced");
                        tracing::warn!(region, ?action, %error, "a write of an old term was refused");
                        break;
                    }
                    tracing::error!(region, ?action, %error, "action failed");
                }
            }
        }
        outcome
    }

    /// This fleet's rows in `region`.
    fn own_rows<'a>(
        &'a self,
        fleet: &'a Fleet,
        region: &'a str,
    ) -> impl Iterator<Item = &'a Instance> {
        let tag = self.fleet_tag();
        fleet
            .instances_in(region)
            .filter(move |i| i.fleet.as_deref() == Some(tag.as_str()))
    }

    /// Sends a write of this term: it lands only while the term's generation holds the lease.
    async fn write<T>(&self, term: &Term, operation: Operation<T>) -> Result<T, ActionError> {
        Ok(self.db.execute(&operation.fenced(term.fence())).await?)
    }

    /// Runs one cloud action: only while the term holds (proved on the database's clock first,
    /// then checked right before the call), cancelled when the term ends, and abandoned at the
    /// action deadline.
    async fn cloud<T>(
        &self,
        term: &Term,
        what: &'static str,
        work: impl Future<Output = Result<T, HostError>>,
    ) -> Result<T, ActionError> {
        self.db
            .execute(&ops::lease_check(term.fence()))
            .await
            .map_err(|error| match error {
                DbError::Fenced { .. } => ActionError::TermEnded,
                other => ActionError::Database(other),
            })?;
        let deadline = self.cloud.action_deadline;
        match tokio::time::timeout(deadline, term.run(work)).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(TermEnded)) => Err(ActionError::TermEnded),
            Err(_) => Err(ActionError::Cloud(HostError::Timeout(deadline, what))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch(
        &self,
        term: &Term,
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
                (tags::TERM.to_owned(), term.generation().to_string()),
                (
                    tags::NAME.to_owned(),
                    format!("whist-{}-{region}-{purpose_name}", self.environment),
                ),
            ]),
        };
        let launched = self
            .cloud(term, "launch", self.hosts.launch(&request))
            .await?;
        tracing::info!(region, count = launched.len(), purpose = purpose_name, image = %image.image_id, "launched hosts");
        // From here on the machines exist: they are reported whatever happens to the rows, so
        // the controller counts them (and the reconciliation records any row that is missing).
        // The rows' writes are fenced like every other: an old term's land before a new term
        // begins or not at all, and the new term's reconciliation records what they missed.
        let rows: Vec<NewInstance> = launched
            .iter()
            .map(|host| self.new_row(host, &image.client_sha))
            .collect();
        let recorded = self.insert_rows(term, &rows).await;
        self.metrics.launched(region, recorded as u32);
        if let Some(upgrade) = upgrade {
            self.write(
                term,
                ops::transition_upgrade(
                    upgrade,
                    &[UpgradeStatus::Pending],
                    UpgradeStatus::Shielded,
                ),
            )
            .await?;
        }
        Ok(rows.iter().map(pending_instance).collect())
    }

    /// Inserts instance rows one by one, so one already present (an idempotent relaunch, a
    /// reconciliation that got there first) does not keep the others out. Returns how many
    /// were new.
    async fn insert_rows(&self, term: &Term, rows: &[NewInstance]) -> usize {
        let mut inserted = 0;
        for row in rows {
            match self
                .write(term, ops::insert_instances(std::slice::from_ref(row)))
                .await
            {
                Ok(_) => inserted += 1,
                Err(ActionError::Database(DbError::ConstraintViolation { .. })) => {}
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
        term: &Term,
        fleet: &Fleet,
        instance_id: &str,
        reason: DrainReason,
    ) -> Result<bool, ActionError> {
        let Some(instance) = fleet.instances.iter().find(|i| i.id == instance_id) else {
            return Ok(false);
        };
        // Conditional on the row being this fleet's and idle now: a claim that raced the
        // decision wins.
        let capacity = capacity_of(&instance.instance_type);
        let drained = self
            .write(
                term,
                ops::drain_idle_instance(instance_id, capacity, &self.fleet_tag()),
            )
            .await?;
        if drained.is_some() {
            tracing::info!(instance.id = instance_id, ?reason, "draining host");
        }
        Ok(drained.is_some())
    }

    async fn terminate(
        &self,
        term: &Term,
        region: &str,
        fleet: &Fleet,
        instance_id: &str,
        reason: TerminateReason,
    ) -> Result<(), ActionError> {
        if !self.own_rows(fleet, region).any(|i| i.id == instance_id) {
            tracing::error!(
                instance.id = instance_id,
                "asked to terminate a host of another fleet: refused"
            );
            return Ok(());
        }
        let ids = [instance_id.to_owned()];
        self.cloud(term, "terminate", self.hosts.terminate(region, &ids))
            .await?;
        let deleted = self
            .write(
                term,
                ops::delete_fleet_instance(instance_id, &self.fleet_tag()),
            )
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
        term: &Term,
        region: &str,
        image: &ImageRef,
        fleet: &Fleet,
    ) -> Result<bool, ActionError> {
        let Some(upgrade) = upgrade_for(fleet, region, image) else {
            return Ok(false);
        };
        let swapped = self
            .write(term, ops::swap_to_upgrade(upgrade))
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
        term: &Term,
        region: &str,
        image: &ImageRef,
        fleet: &Fleet,
        budget: &mut Budget,
    ) -> Result<(), ActionError> {
        let Some(upgrade) = upgrade_for(fleet, region, image) else {
            return Ok(());
        };
        // Claim the rollback first: if the upgrade was swapped meanwhile (another actor, a stale
        // view), its hosts carry sessions now and must not be touched.
        let claimed = self
            .write(
                term,
                ops::transition_upgrade(
                    upgrade,
                    &[UpgradeStatus::Pending, UpgradeStatus::Shielded],
                    UpgradeStatus::RolledBack,
                ),
            )
            .await?;
        if claimed.is_none() {
            return Ok(());
        }
        // Within the pass's budget; hosts left over are PRE_CONNECTION on an image that is
        // neither current nor upgrading, which later passes reap as never ready.
        let ids: Vec<String> = self
            .own_rows(fleet, region)
            .filter(|i| i.image_id == image.image_id && i.status != InstanceStatus::Active)
            .map(|i| i.id.clone())
            .take_while(|_| budget.take())
            .collect();
        self.cloud(term, "terminate", self.hosts.terminate(region, &ids))
            .await?;
        for id in &ids {
            if self
                .write(term, ops::delete_fleet_instance(id, &self.fleet_tag()))
                .await?
            {
                self.metrics.terminated(region, "rolled_back");
            }
        }
        self.metrics.upgrade(region, "rolled_back");
        tracing::error!(region, image = %image.image_id, hosts = ids.len(), "image upgrade rolled back: its hosts never became ACTIVE");
        Ok(())
    }

    /// Makes the cloud and the database agree for `region`:
    /// - a machine of this fleet without any row is recorded while young (it was launched and
    ///   the insert never happened) and terminated once older than the ready timeout (its host
    ///   drained and left);
    /// - a row of this fleet whose machine the cloud, asked by id, reports terminated or
    ///   unknown for longer than the grace (counted in `gone_since`) is deleted with its
    ///   mandelboxes.
    ///
    /// A suspicious listing (see [`Suspicion`]) pauses both destructive steps; at most the
    /// pass's budget of hosts is terminated or deleted.
    pub async fn reconcile(
        &self,
        term: &Term,
        region: &str,
        fleet: &Fleet,
        mut gone_since: HashMap<String, DateTime<Utc>>,
        now: DateTime<Utc>,
        ready_timeout: chrono::Duration,
    ) -> Result<Reconciled, ActionError> {
        let fleet_tag = self.fleet_tag();
        let cloud = self
            .cloud(
                term,
                "list",
                self.hosts.list(region, (tags::FLEET, &fleet_tag)),
            )
            .await?;
        let listed: HashMap<&str, &CloudHost> =
            cloud.iter().map(|host| (host.id.as_str(), host)).collect();
        // Any row, of any fleet, keeps its machine: only machines nobody records are leftovers.
        let any_row: HashSet<&str> = fleet.instances_in(region).map(|i| i.id.as_str()).collect();
        let own: Vec<&Instance> = self.own_rows(fleet, region).collect();
        let mut report = Reconciled::default();

        let (young, old): (Vec<&CloudHost>, Vec<&CloudHost>) = cloud
            .iter()
            .filter(|host| matches!(host.state, CloudState::Pending | CloudState::Running))
            .filter(|host| !any_row.contains(host.id.as_str()))
            .filter(|host| {
                host.launched_at
                    .is_none_or(|at| now - at > self.safety.reconcile_grace)
            })
            .partition(|host| host.launched_at.is_some_and(|at| now - at < ready_timeout));
        // Young machines were launched and never recorded: record them, they are booting.
        // Adding a row destroys nothing, so it is done whatever the listing looks like.
        let unrecorded: Vec<NewInstance> = young
            .iter()
            .map(|host| {
                let client_sha = host.tags.get(tags::CLIENT_SHA).cloned().unwrap_or_default();
                self.new_row(host, &client_sha)
            })
            .collect();
        if !unrecorded.is_empty() {
            tracing::warn!(
                region,
                count = unrecorded.len(),
                "recording hosts launched but never recorded"
            );
            self.insert_rows(term, &unrecorded).await;
            report.recorded = unrecorded.iter().map(pending_instance).collect();
        }

        // Is the listing to be believed? Rows of this fleet that it lacks entirely (a
        // terminated machine is still listed, as terminated) mean a wrong endpoint, lost
        // permissions, a partial answer or removed tags far more often than machines that
        // vanished without a trace.
        let missing = own
            .iter()
            .filter(|i| !listed.contains_key(i.id.as_str()))
            .count();
        let running = cloud
            .iter()
            .filter(|host| matches!(host.state, CloudState::Pending | CloudState::Running))
            .count();
        let threshold = self.safety.listing_loss_threshold;
        let suspicion = if !own.is_empty() && cloud.is_empty() {
            Some(Suspicion::EmptyListing)
        } else if !own.is_empty() && missing as f64 > threshold * own.len() as f64 {
            Some(Suspicion::LostRows {
                missing,
                rows: own.len(),
            })
        } else if old.len() >= 2 && old.len() as f64 > threshold * running as f64 {
            Some(Suspicion::UnrecordedMachines {
                unrecorded: old.len(),
                machines: running,
            })
        } else {
            None
        };
        self.metrics
            .destruction_paused(region, suspicion.map(Suspicion::label));
        if let Some(suspicion) = suspicion {
            tracing::error!(
                region,
                ?suspicion,
                listed = cloud.len(),
                rows = own.len(),
                "the cloud's listing does not match the rows: nothing is terminated or deleted in this region until it does"
            );
            report.paused = Some(suspicion);
            report.gone_since = gone_since;
            return Ok(report);
        }

        let mut budget = Budget::for_region(&self.safety, own.len());
        // Old machines without a row: their host drained and left; they only cost money.
        let leftovers: Vec<String> = old
            .iter()
            .map(|host| host.id.clone())
            .filter(|_| {
                let take = budget.take();
                report.deferred += u32::from(!take);
                take
            })
            .collect();
        if !leftovers.is_empty() {
            tracing::warn!(
                region,
                count = leftovers.len(),
                "terminating hosts without a row"
            );
            self.cloud(term, "terminate", self.hosts.terminate(region, &leftovers))
                .await?;
            for _ in &leftovers {
                self.metrics.terminated(region, "unrecorded");
            }
        }

        // Rows whose machine the listing lacks or shows ending: ask the cloud about each by id.
        let doubtful: Vec<String> = own
            .iter()
            .filter(|i| {
                listed.get(i.id.as_str()).is_none_or(|host| {
                    matches!(
                        host.state,
                        CloudState::Terminated | CloudState::ShuttingDown
                    )
                })
            })
            .map(|i| i.id.clone())
            .collect();
        let described = if doubtful.is_empty() {
            HashMap::new()
        } else {
            self.cloud(term, "describe", self.hosts.describe(region, &doubtful))
                .await?
        };
        let mut still_gone = HashMap::new();
        for id in &doubtful {
            match described.get(id) {
                Some(None)
                | Some(Some(CloudHost {
                    state: CloudState::Terminated,
                    ..
                })) => {
                    still_gone.insert(id.clone(), *gone_since.get(id).unwrap_or(&now));
                }
                Some(Some(host)) if host.state == CloudState::ShuttingDown => {}
                Some(Some(host)) => tracing::warn!(
                    instance.id = %id,
                    state = ?host.state,
                    "a host's machine exists but is not listed under the fleet's tag (was the tag removed?): its row is kept"
                ),
                None => tracing::warn!(instance.id = %id, "the cloud did not answer for a host"),
            }
        }
        gone_since = still_gone;
        let mut deletions: Vec<(&String, &DateTime<Utc>)> = gone_since
            .iter()
            .filter(|(_, since)| now - **since > self.safety.reconcile_grace)
            .collect();
        deletions.sort();
        for (id, since) in deletions {
            if !budget.take() {
                report.deferred += 1;
                self.metrics.deferred(region);
                continue;
            }
            if self
                .write(term, ops::delete_fleet_instance(id, &fleet_tag))
                .await?
            {
                report.deleted += 1;
                tracing::warn!(instance.id = %id, gone_since = %since, "deleted the row of a host whose machine is gone");
                self.metrics.terminated(region, "vanished");
            }
        }
        report.gone_since = gone_since;
        Ok(report)
    }

    fn new_row(&self, host: &CloudHost, client_sha: &str) -> NewInstance {
        NewInstance {
            id: host.id.clone(),
            provider: PROVIDER_AWS.to_owned(),
            region: host.region.clone(),
            image_id: host.image_id.clone(),
            client_sha: client_sha.to_owned(),
            instance_type: host.instance_type.clone(),
            remaining_capacity: capacity_of(&host.instance_type) as i32,
            status: InstanceStatus::PreConnection,
            fleet: Some(self.fleet_tag()),
        }
    }
}

/// Takes the reaping of silent hosts out of `actions` when more than `threshold` of the
/// region's hosts that should be beating (this fleet's, registered), and at least two, fell
/// silent at once: that is the hosts' network or the database, not that many deaths, and
/// reaping would end every session they still serve. Once other hosts beat normally again
/// (replacements that registered, say), a silence is the silent hosts' own and they are reaped.
/// Returns the actions left and how many were held back.
pub fn hold_back_mass_silence(
    actions: Vec<Action>,
    snapshot: &RegionSnapshot,
    threshold: f64,
) -> (Vec<Action>, usize) {
    let silent = actions.iter().filter(|action| is_reap(action)).count();
    let beating = snapshot
        .hosts
        .iter()
        .filter(|host| host.owned && host.status != InstanceStatus::PreConnection)
        .count();
    if silent >= 2 && silent as f64 > threshold * beating as f64 {
        (without_reaps(actions), silent)
    } else {
        (actions, 0)
    }
}

/// `actions` without the reaping of silent hosts.
pub fn without_reaps(actions: Vec<Action>) -> Vec<Action> {
    actions
        .into_iter()
        .filter(|action| !is_reap(action))
        .collect()
}

fn is_reap(action: &Action) -> bool {
    matches!(
        action,
        Action::Terminate {
            reason: TerminateReason::HeartbeatLost,
            ..
        }
    )
}

fn upgrade_for<'a>(fleet: &'a Fleet, region: &str, image: &ImageRef) -> Option<&'a ImageUpgrade> {
    fleet
        .upgrades
        .get(region)
        .filter(|upgrade| upgrade.image_id == image.image_id)
}

/// The row the database will show for a launch, until the live query shows the real one.
fn pending_instance(row: &NewInstance) -> Instance {
    let now = Utc::now();
    Instance {
        id: row.id.clone(),
        provider: row.provider.clone(),
        region: row.region.clone(),
        image_id: row.image_id.clone(),
        client_sha: row.client_sha.clone(),
        ip_addr: None,
        instance_type: row.instance_type.clone(),
        remaining_capacity: row.remaining_capacity,
        status: row.status,
        created_at: now,
        updated_at: now,
        fleet: row.fleet.clone(),
        heartbeat_at: now,
        tls_fingerprint: None,
    }
}

/// EC2 client tokens are at most 64 ASCII characters; a digest keeps any key within that.
fn token(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Cloud(#[from] HostError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("the leader term ended")]
    TermEnded,
}

#[cfg(test)]
mod scenarios;

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

    fn snapshot(hosts: &[(InstanceStatus, bool)]) -> RegionSnapshot {
        use crate::algorithm::{HostView, ScalingSettings};
        let now = Utc::now();
        RegionSnapshot {
            region: "r".into(),
            enabled: true,
            desired_free: 0,
            schedule: crate::algorithm::BufferSchedule::default(),
            instance_types: Vec::new(),
            unavailable_types: Vec::new(),
            current_image: None,
            upgrade: None,
            published_client_sha: None,
            hosts: hosts
                .iter()
                .enumerate()
                .map(|(n, &(status, owned))| HostView {
                    id: format!("h{n}"),
                    image_id: "ami".into(),
                    instance_type: "g4dn.2xlarge".into(),
                    status,
                    capacity: 2,
                    remaining: 2,
                    created_at: now,
                    heartbeat_at: now,
                    owned,
                    idle_since: None,
                })
                .collect(),
            settings: ScalingSettings {
                scale_up_cooldown: chrono::Duration::zero(),
                scale_down_cooldown: chrono::Duration::zero(),
                scale_down_delay: chrono::Duration::zero(),
                heartbeat_timeout: chrono::Duration::zero(),
                instance_ready_timeout: chrono::Duration::zero(),
                schedule_lead: chrono::Duration::zero(),
            },
            last_scale_up: None,
            last_scale_down: None,
        }
    }

    fn reap(n: usize) -> Action {
        Action::Terminate {
            instance_id: format!("h{n}"),
            reason: TerminateReason::HeartbeatLost,
        }
    }

    #[test]
    fn most_hosts_falling_silent_at_once_are_not_reaped() {
        use InstanceStatus::{Active, Draining, PreConnection};
        let drained = Action::Terminate {
            instance_id: "h9".into(),
            reason: TerminateReason::Drained,
        };
        // (name, hosts as (status, owned), the algorithm's actions, how many are held back)
        type Case<'a> = (&'a str, &'a [(InstanceStatus, bool)], Vec<Action>, usize);
        let cases: [Case<'_>; 6] = [
            (
                "2 of 3 silent",
                &[(Active, true); 3],
                vec![reap(0), reap(1)],
                2,
            ),
            (
                "a lone silent host is reaped",
                &[(Active, true)],
                vec![reap(0)],
                0,
            ),
            ("1 of 3 silent", &[(Active, true); 3], vec![reap(0)], 0),
            (
                "2 of 4: not most",
                &[(Active, true); 4],
                vec![reap(0), reap(1)],
                0,
            ),
            (
                "booting hosts do not dilute",
                &[
                    (Active, true),
                    (Draining, true),
                    (Active, true),
                    (PreConnection, true),
                    (PreConnection, true),
                ],
                vec![reap(0), reap(1), drained.clone()],
                2,
            ),
            (
                "hosts of no fleet do not dilute",
                &[
                    (Active, true),
                    (Active, true),
                    (Active, false),
                    (Active, false),
                ],
                vec![reap(0), reap(1)],
                2,
            ),
        ];
        for (name, hosts, actions, held) in cases {
            let (left, silent) = hold_back_mass_silence(actions.clone(), &snapshot(hosts), 0.5);
            assert_eq!(silent, held, "{name}");
            if held > 0 {
                assert!(
                    left.iter().all(|action| !matches!(
                        action,
                        Action::Terminate {
                            reason: TerminateReason::HeartbeatLost,
                            ..
                        }
                    )),
                    "{name}: {left:?}"
                );
                assert_eq!(
                    left.len(),
                    actions.len() - held,
                    "{name}: other actions stay"
                );
            } else {
                assert_eq!(left, actions, "{name}");
            }
        }
    }

    #[test]
    fn a_pass_destroys_a_share_of_the_region_and_at_least_one_host() {
        let safety = Safety::default();
        for (hosts, allowed) in [(0, 1), (1, 1), (9, 1), (10, 1), (19, 1), (20, 2), (105, 10)] {
            let mut budget = Budget::for_region(&safety, hosts);
            let mut taken = 0;
            while budget.take() {
                taken += 1;
            }
            assert_eq!(taken, allowed, "{hosts} hosts");
        }
    }
}
