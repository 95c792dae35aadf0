//! The leader's loop: one `select!` over fleet changes, a periodic resync and cancellation. Each
//! region is decided on its own and its actions run in their own task, so one slow region (a
//! launch waiting on the cloud) never holds up another.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use whist_types::{Environment, FleetSettings, InstanceStatus, UpgradeStatus, capacity_of};

use crate::algorithm::{
    Action, HostView, ImageRef, RegionSnapshot, ScalingAlgorithm, ScalingSettings, UpgradeState,
    UpgradeView,
};
use crate::executor::{Executor, Outcome};
use crate::fleet::{Fleet, FleetView};
use crate::metrics::Metrics;

/// Launched hosts the live query has not shown yet stay counted this long at most.
const LAUNCH_VISIBILITY_GRACE: chrono::Duration = chrono::Duration::minutes(2);

/// How long the end of a leader term waits for its region tasks.
const TERM_END_GRACE: Duration = Duration::from_secs(60);

/// Settings used until the database's row has been read.
const DEFAULT_SETTINGS: FleetSettings = FleetSettings {
    mandelbox_limit_per_user: 3,
    scale_up_cooldown_seconds: 60,
    scale_down_cooldown_seconds: 300,
    scale_down_delay_seconds: 600,
    heartbeat_timeout_seconds: 180,
    instance_ready_timeout_seconds: 900,
};

/// What a finished task of the controller reports.
enum Report {
    Region(String, Outcome),
    Reconciled,
}

#[derive(Debug)]
pub struct Controller {
    pub fleet: FleetView,
    pub algorithm: Arc<dyn ScalingAlgorithm>,
    pub executor: Arc<Executor>,
    pub environment: Environment,
    pub resync_interval: Duration,
    pub metrics: Arc<Metrics>,
    /// Regions this controller owns; all when empty.
    pub managed_regions: Vec<String>,
    /// Settings that replace the database's (tests).
    pub settings: Option<FleetSettings>,
}

/// What one region remembers between decisions.
#[derive(Debug, Default)]
struct RegionMemory {
    busy: bool,
    last_scale_up: Option<DateTime<Utc>>,
    last_scale_down: Option<DateTime<Utc>>,
    /// Hosts launched here that the fleet view may not show yet.
    launched: Vec<(DateTime<Utc>, HostView)>,
    /// The image this region was swapped to, until the fleet view shows it as current (the
    /// images and upgrades live queries arrive separately; in between, the new hosts must not
    /// look like an old image).
    swapped_to: Option<(DateTime<Utc>, ImageRef)>,
    /// Failed actions in a row, and when the region may be decided again.
    failures: u32,
    retry_at: Option<DateTime<Utc>>,
}

impl Controller {
    /// Runs until `stop`, then waits (bounded) for the region tasks it started, so the next
    /// leader term never overlaps work of this one.
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = self.fleet.changes();
        let mut resync = tokio::time::interval(self.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tasks = tokio::task::JoinSet::new();
        let mut regions: HashMap<String, RegionMemory> = HashMap::new();
        let mut reconciling = false;
        let mut warned_stale = false;
        loop {
            let mut dirty: HashSet<String> = HashSet::new();
            tokio::select! {
                () = stop.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    dirty.extend(self.regions(&self.fleet.current()));
                }
                _ = resync.tick() => {
                    let fleet = self.fleet.current();
                    dirty.extend(self.regions(&fleet));
                    if fleet.complete && self.fleet.live() && !reconciling {
                        reconciling = true;
                        let executor = self.executor.clone();
                        let regions = self.regions(&fleet);
                        let ready_timeout = self.settings(&fleet).instance_ready_timeout_seconds;
                        tasks.spawn(async move {
                            for region in regions {
                                if let Err(error) = executor
                                    .reconcile(&region, &fleet, Utc::now(), ready_timeout)
                                    .await
                                {
                                    executor.metrics.error("reconcile");
                                    tracing::warn!(region, %error, "reconcile failed");
                                }
                            }
                            Report::Reconciled
                        });
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    match joined {
                        Ok(Report::Reconciled) => reconciling = false,
                        Ok(Report::Region(region, outcome)) => {
                            self.remember(regions.entry(region.clone()).or_default(), &outcome);
                            dirty.insert(region);
                        }
                        Err(error) => {
                            // A panicked task: its region or reconcile must not stay blocked.
                            tracing::error!(%error, "scaling task failed");
                            self.metrics.error("task");
                            reconciling = false;
                            for memory in regions.values_mut() {
                                memory.busy = false;
                            }
                        }
                    }
                }
            }
            let fleet = self.fleet.current();
            if !fleet.complete {
                continue;
            }
            // A frozen view (live queries down) would make every decision on stale rows.
            if !self.fleet.live() {
                if !warned_stale {
                    tracing::warn!("live queries are down: scaling paused until they recover");
                    warned_stale = true;
                }
                continue;
            }
            warned_stale = false;
            for region in dirty {
                // A region without a configuration row is not ours to shape (it may also only
                // look so because the regions live query has not caught up with the instances
                // one): nothing is decided for it until its row exists.
                if !fleet.regions.contains_key(&region) {
                    continue;
                }
                let memory = regions.entry(region.clone()).or_default();
                let now = Utc::now();
                if memory.busy || memory.retry_at.is_some_and(|at| now < at) {
                    continue;
                }
                memory.launched.retain(|(at, host)| {
                    now - *at < LAUNCH_VISIBILITY_GRACE
                        && !fleet.instances.iter().any(|i| i.id == host.id)
                });
                if let Some((at, image)) = &memory.swapped_to
                    && (fleet
                        .images
                        .get(&region)
                        .is_some_and(|i| i.image_id == image.image_id)
                        || now - *at > LAUNCH_VISIBILITY_GRACE)
                {
                    memory.swapped_to = None;
                }
                let mut snapshot = snapshot(&fleet, &region, self.environment, memory);
                snapshot.settings = scaling_settings(&self.settings(&fleet));
                self.record_metrics(&snapshot);
                let actions = self.algorithm.decide(&snapshot, now);
                if actions.is_empty() {
                    continue;
                }
                tracing::debug!(region, ?actions, "decided");
                memory.busy = true;
                if actions.iter().any(|a| matches!(a, Action::Launch { .. })) {
                    // Cooldowns count from the attempt, so a failing launch cannot repeat at once.
                    memory.last_scale_up = Some(now);
                }
                let executor = self.executor.clone();
                let fleet = fleet.clone();
                tasks.spawn(async move {
                    let outcome = executor.run(&region, actions, &fleet).await;
                    Report::Region(region, outcome)
                });
            }
        }
        // Let in-flight actions finish (a launch must reach its insert) before the lease goes.
        let drained = tokio::time::timeout(TERM_END_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("scaling tasks still running at the end of the term; aborting them");
            tasks.abort_all();
        }
    }

    fn remember(&self, memory: &mut RegionMemory, outcome: &Outcome) {
        let now = Utc::now();
        memory.busy = false;
        memory.launched.extend(
            outcome
                .launched
                .iter()
                .map(|instance| (now, host_view(instance, &Fleet::default()))),
        );
        if outcome.drained > 0 {
            memory.last_scale_down = Some(now);
        }
        if let Some(image) = &outcome.swapped_to {
            memory.swapped_to = Some((now, image.clone()));
        }
        if outcome.errors > 0 {
            // Back off so a persistent failure (a refused image, the database down) is retried
            // at a capped pace instead of as fast as the cloud answers.
            memory.failures += 1;
            let delay = chrono::Duration::seconds(1 << memory.failures.min(6));
            memory.retry_at = Some(now + delay);
        } else {
            memory.failures = 0;
            memory.retry_at = None;
        }
    }

    fn settings(&self, fleet: &Fleet) -> FleetSettings {
        self.settings
            .clone()
            .or_else(|| fleet.settings.clone())
            .unwrap_or(DEFAULT_SETTINGS)
    }

    /// The regions this controller decides for.
    fn regions(&self, fleet: &Fleet) -> Vec<String> {
        let mut regions = fleet.regions_with_anything();
        if !self.managed_regions.is_empty() {
            regions.retain(|region| self.managed_regions.contains(region));
        }
        regions
    }

    fn record_metrics(&self, snapshot: &RegionSnapshot) {
        let current = snapshot.current_image.as_ref().map(|i| i.image_id.as_str());
        let free: i64 = snapshot
            .hosts
            .iter()
            .filter(|h| Some(h.image_id.as_str()) == current)
            .map(|h| match h.status {
                InstanceStatus::Active => i64::from(h.remaining.max(0)),
                InstanceStatus::PreConnection => i64::from(h.capacity),
                InstanceStatus::Draining => 0,
            })
            .sum();
        let count = |status| snapshot.hosts.iter().filter(|h| h.status == status).count() as i64;
        self.metrics.region(
            &snapshot.region,
            snapshot.desired_free,
            free,
            &[
                ("PRE_CONNECTION", count(InstanceStatus::PreConnection)),
                ("ACTIVE", count(InstanceStatus::Active)),
                ("DRAINING", count(InstanceStatus::Draining)),
            ],
        );
    }
}

/// One region's snapshot from the fleet view plus what this controller remembers.
fn snapshot(
    fleet: &Fleet,
    region: &str,
    environment: Environment,
    memory: &RegionMemory,
) -> RegionSnapshot {
    let config = fleet.regions.get(region);
    let mut hosts: Vec<HostView> = fleet
        .instances_in(region)
        .map(|instance| host_view(instance, fleet))
        .collect();
    hosts.extend(memory.launched.iter().map(|(_, host)| host.clone()));
    let settings = fleet.settings.clone().unwrap_or(DEFAULT_SETTINGS);
    let swapped = memory.swapped_to.as_ref().map(|(_, image)| image.clone());
    RegionSnapshot {
        region: region.to_owned(),
        enabled: config.is_some_and(|c| c.enabled),
        desired_free: config.map_or(0, |c| c.desired_free_mandelboxes.max(0) as u32),
        instance_types: config.map(|c| c.instance_types.clone()).unwrap_or_default(),
        current_image: swapped.clone().or_else(|| {
            fleet.images.get(region).map(|image| ImageRef {
                image_id: image.image_id.clone(),
                client_sha: image.client_sha.clone(),
            })
        }),
        upgrade: fleet
            .upgrades
            .get(region)
            .filter(|_| swapped.is_none())
            .and_then(|upgrade| {
                let state = match upgrade.status {
                    UpgradeStatus::Pending => UpgradeState::Pending,
                    UpgradeStatus::Shielded => UpgradeState::Shielded,
                    UpgradeStatus::Swapped | UpgradeStatus::RolledBack => return None,
                };
                Some(UpgradeView {
                    image: ImageRef {
                        image_id: upgrade.image_id.clone(),
                        client_sha: upgrade.client_sha.clone(),
                    },
                    state,
                    deadline: upgrade.deadline_at,
                })
            }),
        published_client_sha: fleet
            .desktop_app_version
            .as_ref()
            .map(|version| version.commit_hash(environment).to_owned()),
        hosts,
        settings: scaling_settings(&settings),
        last_scale_up: memory.last_scale_up,
        last_scale_down: memory.last_scale_down,
    }
}

fn scaling_settings(settings: &FleetSettings) -> ScalingSettings {
    let seconds = |value: i32| chrono::Duration::seconds(i64::from(value.max(0)));
    ScalingSettings {
        scale_up_cooldown: seconds(settings.scale_up_cooldown_seconds),
        scale_down_cooldown: seconds(settings.scale_down_cooldown_seconds),
        scale_down_delay: seconds(settings.scale_down_delay_seconds),
        heartbeat_timeout: seconds(settings.heartbeat_timeout_seconds),
        instance_ready_timeout: seconds(settings.instance_ready_timeout_seconds),
    }
}

fn host_view(instance: &whist_types::Instance, fleet: &Fleet) -> HostView {
    HostView {
        id: instance.id.clone(),
        image_id: instance.image_id.clone(),
        instance_type: instance.instance_type.clone(),
        status: instance.status,
        capacity: capacity_of(&instance.instance_type),
        remaining: instance.remaining_capacity,
        created_at: instance.created_at,
        heartbeat_at: instance.updated_at,
        idle_since: fleet.idle_since.get(&instance.id).copied(),
    }
}
