//! The leader's loop: one `select!` over fleet changes, a periodic resync and cancellation. Each
//! region is decided on its own and its actions run in their own task, so one slow region (a
//! launch waiting on the cloud) never holds up another.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use whist_types::{Environment, FleetSettings, InstanceStatus, UpgradeStatus, capacity_of};

use crate::algorithm::{
    HostView, ImageRef, RegionSnapshot, ScalingAlgorithm, ScalingSettings, UpgradeState,
    UpgradeView,
};
use crate::executor::{Executor, Outcome};
use crate::fleet::{Fleet, FleetView};
use crate::metrics::Metrics;

/// Launched hosts the live query has not shown yet stay counted this long at most.
const LAUNCH_VISIBILITY_GRACE: chrono::Duration = chrono::Duration::minutes(2);

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
}

impl Controller {
    /// Runs until `stop`; region tasks still running then finish on their own.
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = self.fleet.changes();
        let mut resync = tokio::time::interval(self.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (done_tx, mut done) = mpsc::unbounded_channel::<(String, Outcome)>();
        let mut regions: HashMap<String, RegionMemory> = HashMap::new();
        let mut reconciling = false;
        let (reconciled_tx, mut reconciled) = mpsc::unbounded_channel::<()>();
        loop {
            let mut dirty: HashSet<String> = HashSet::new();
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    dirty.extend(self.regions(&self.fleet.current()));
                }
                _ = resync.tick() => {
                    let fleet = self.fleet.current();
                    dirty.extend(self.regions(&fleet));
                    if fleet.complete && !reconciling {
                        reconciling = true;
                        let executor = self.executor.clone();
                        let tx = reconciled_tx.clone();
                        let regions = self.regions(&fleet);
                        tokio::spawn(async move {
                            for region in regions {
                                if let Err(error) = executor.reconcile(&region, &fleet, Utc::now()).await {
                                    executor.metrics.error("reconcile");
                                    tracing::warn!(region, %error, "reconcile failed");
                                }
                            }
                            let _ = tx.send(());
                        });
                    }
                }
                Some(()) = reconciled.recv() => reconciling = false,
                Some((region, outcome)) = done.recv() => {
                    let memory = regions.entry(region.clone()).or_default();
                    memory.busy = false;
                    let now = Utc::now();
                    if !outcome.launched.is_empty() {
                        memory.last_scale_up = Some(now);
                        memory.launched.extend(outcome.launched.iter().map(|instance| {
                            (now, host_view(instance, &Fleet::default()))
                        }));
                    }
                    if outcome.drained > 0 {
                        memory.last_scale_down = Some(now);
                    }
                    dirty.insert(region);
                }
            }
            let fleet = self.fleet.current();
            if !fleet.complete {
                continue;
            }
            for region in dirty {
                let memory = regions.entry(region.clone()).or_default();
                if memory.busy {
                    continue;
                }
                let now = Utc::now();
                memory.launched.retain(|(at, host)| {
                    now - *at < LAUNCH_VISIBILITY_GRACE
                        && !fleet.instances.iter().any(|i| i.id == host.id)
                });
                let mut snapshot = snapshot(&fleet, &region, self.environment, memory);
                if let Some(settings) = &self.settings {
                    snapshot.settings = scaling_settings(settings);
                }
                self.record_metrics(&snapshot);
                let actions = self.algorithm.decide(&snapshot, now);
                if actions.is_empty() {
                    continue;
                }
                tracing::debug!(region, ?actions, "decided");
                memory.busy = true;
                let executor = self.executor.clone();
                let tx = done_tx.clone();
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    let outcome = executor.run(&region, actions, &fleet).await;
                    let _ = tx.send((region, outcome));
                });
            }
        }
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
    let settings = fleet.settings.clone().unwrap_or(FleetSettings {
        mandelbox_limit_per_user: 3,
        scale_up_cooldown_seconds: 60,
        scale_down_cooldown_seconds: 300,
        scale_down_delay_seconds: 600,
        heartbeat_timeout_seconds: 180,
        instance_ready_timeout_seconds: 900,
    });
    RegionSnapshot {
        region: region.to_owned(),
        enabled: config.is_some_and(|c| c.enabled),
        desired_free: config.map_or(0, |c| c.desired_free_mandelboxes.max(0) as u32),
        instance_types: config.map(|c| c.instance_types.clone()).unwrap_or_default(),
        current_image: fleet.images.get(region).map(|image| ImageRef {
            image_id: image.image_id.clone(),
            client_sha: image.client_sha.clone(),
        }),
        upgrade: fleet.upgrades.get(region).and_then(|upgrade| {
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
