//! The leader's loop: one `select!` over fleet changes, a periodic resync, the term's end and
//! cancellation. Each region is decided on its own and its actions run in their own task, so one
//! slow region (a launch waiting on the cloud) never holds up another.
//!
//! A term begins by reconciling every region before deciding anything, so machines an earlier
//! leader launched but could not record are counted rather than launched again. A term ends
//! when its lease deadline passes (the executor's cloud calls are cancelled then) or when the
//! service stops; either way its tasks get no longer than the lease has left.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use whist_types::{Environment, FleetSettings, InstanceStatus, UpgradeStatus, capacity_of};

use crate::algorithm::{
    Action, BufferSchedule, HostView, ImageRef, RegionSnapshot, ScalingAlgorithm, ScalingSettings,
    UpgradeState, UpgradeView,
};
use crate::executor::{
    Executor, Outcome, Reconciled, fleet_name, hold_back_mass_silence, without_reaps,
};
use crate::fleet::{Fleet, FleetView};
use crate::leader::Term;
use crate::metrics::Metrics;

/// Launched hosts the live query has not shown yet stay counted this long at most.
const LAUNCH_VISIBILITY_GRACE: chrono::Duration = chrono::Duration::minutes(2);

/// How soon a reconciliation that failed for some region is tried again.
const RECONCILE_RETRY: Duration = Duration::from_secs(5);

/// How long an instance type the cloud had no capacity for is skipped in a region.
const CAPACITY_SHORTAGE_MEMORY: chrono::Duration = chrono::Duration::minutes(5);

/// What a finished task of the controller reports.
enum Report {
    Region(String, Outcome),
    /// The regions reconciled, and how many were attempted.
    Reconciled(Vec<(String, Reconciled)>, usize),
}

/// What a running task is doing, so that a panicked one frees only what it held.
enum Work {
    Region(String),
    Reconcile,
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
    /// Hosts launched (or recorded) here that the fleet view may not show yet.
    launched: Vec<(DateTime<Utc>, HostView)>,
    /// The image this region was swapped to, until the fleet view shows it as current (the
    /// images and upgrades live queries arrive separately; in between, the new hosts must not
    /// look like an old image).
    swapped_to: Option<(DateTime<Utc>, ImageRef)>,
    /// Failed actions in a row, and when the region may be decided again.
    failures: u32,
    retry_at: Option<DateTime<Utc>>,
    /// Instance types the cloud had no capacity for, until when.
    short_of: HashMap<String, DateTime<Utc>>,
    /// Since when each row's machine has been reported gone (reconciliation's grace).
    gone_since: HashMap<String, DateTime<Utc>>,
    /// Rows of another fleet were seen here: nothing is decided for the region.
    foreign: bool,
    /// This term reconciled the region (machines an earlier term launched are recorded).
    reconciled: bool,
    /// Reaping is held back: most hosts fell silent at once.
    mass_silence: bool,
    /// Until when reaping stays held back after a mass silence was last seen.
    silence_hold_until: Option<DateTime<Utc>>,
}

impl Controller {
    /// Runs until the term ends or `stop`, then waits (no longer than the lease has left) for
    /// the tasks it started, so the next term never overlaps work of this one.
    pub async fn run(self, term: Term, stop: CancellationToken) {
        let mut changes = self.fleet.changes();
        let mut resync = tokio::time::interval(self.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tasks: JoinSet<Report> = JoinSet::new();
        let mut work: HashMap<Id, Work> = HashMap::new();
        let mut regions: HashMap<String, RegionMemory> = HashMap::new();
        let mut reconciling = false;
        let mut warned_stale = false;
        // A region is decided only once this term has reconciled it. Reconciliation is due at
        // every resync; a region it could not reconcile is tried again after a short pause.
        let mut reconcile_due = true;
        let mut reconcile_retry_at = tokio::time::Instant::now();
        loop {
            let mut dirty: HashSet<String> = HashSet::new();
            tokio::select! {
                () = stop.cancelled() => break,
                () = term.ended() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    dirty.extend(self.regions(&self.fleet.current()));
                }
                _ = resync.tick() => {
                    dirty.extend(self.regions(&self.fleet.current()));
                    reconcile_due = true;
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    match joined {
                        Ok((id, Report::Reconciled(results, attempted))) => {
                            work.remove(&id);
                            reconciling = false;
                            // A region that could not be reconciled is tried again after a pause.
                            if results.len() < attempted {
                                reconcile_retry_at = tokio::time::Instant::now() + RECONCILE_RETRY;
                            }
                            let (now, own) = (term.db_now(), self.fleet_tag());
                            for (region, result) in results {
                                let memory = regions.entry(region.clone()).or_default();
                                memory.reconciled = true;
                                memory.gone_since = result.gone_since;
                                // Recorded rows count at once, before the live query shows them.
                                let recorded = result.recorded.iter();
                                let views = recorded.map(|row| host_view(row, &Fleet::default(), &own));
                                memory.launched.extend(views.map(|view| (now, view)));
                                dirty.insert(region);
                            }
                        }
                        Ok((id, Report::Region(region, outcome))) => {
                            work.remove(&id);
                            let memory = regions.entry(region.clone()).or_default();
                            self.remember(memory, &outcome, term.db_now());
                            dirty.insert(region);
                        }
                        Err(error) => {
                            // A panicked task frees only what it held.
                            tracing::error!(%error, "scaling task failed");
                            self.metrics.error("task");
                            match work.remove(&error.id()) {
                                Some(Work::Region(region)) => {
                                    let memory = regions.entry(region.clone()).or_default();
                                    memory.busy = false;
                                    memory.failures += 1;
                                    let retry_at = term.db_now() + backoff(memory.failures);
                                    memory.retry_at = Some(retry_at);
                                }
                                Some(Work::Reconcile) => reconciling = false,
                                None => {}
                            }
                        }
                    }
                }
            }
            let fleet = self.fleet.current();
            if !fleet.complete {
                continue;
            }
            // At a resync every region; otherwise only those this term has not reconciled yet
            // (a region configured meanwhile), so a new region is decided for without waiting
            // for all the others.
            let unreconciled: Vec<String> = self
                .regions(&fleet)
                .into_iter()
                .filter(|region| regions.get(region).is_none_or(|memory| !memory.reconciled))
                .collect();
            if !reconciling
                && self.fleet.live()
                && (reconcile_due || !unreconciled.is_empty())
                && tokio::time::Instant::now() >= reconcile_retry_at
            {
                reconciling = true;
                let only = (!reconcile_due).then_some(unreconciled);
                reconcile_due = false;
                let handle = tasks.spawn(self.reconcile_all(&term, &fleet, &regions, only));
                work.insert(handle.id(), Work::Reconcile);
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
                self.note_foreign_rows(&fleet, &region, memory);
                let now = term.db_now();
                if !memory.reconciled
                    || memory.foreign
                    || memory.busy
                    || memory.retry_at.is_some_and(|at| now < at)
                {
                    continue;
                }
                memory.launched.retain(|(at, host)| {
                    now - *at < LAUNCH_VISIBILITY_GRACE
                        && !fleet.instances.iter().any(|i| i.id == host.id)
                });
                memory.short_of.retain(|_, until| now < *until);
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
                if !snapshot.schedule.is_empty() && !snapshot.schedule.zone_known() {
                    // The database checks zone names; one this build does not know (an older
                    // zone table) leaves the region on its default target.
                    self.metrics.error("schedule_time_zone");
                }
                self.record_metrics(&snapshot, now);
                let decided = self.algorithm.decide(&snapshot, now);
                let threshold = self.executor.safety.heartbeat_loss_threshold;
                let (mut actions, silent) = hold_back_mass_silence(decided, &snapshot, threshold);
                // Hosts come back one by one: the last of a mass silence must not be reaped the
                // moment the others beat again, so reaping stays held back for a heartbeat
                // timeout after the silence was last seen massive.
                if silent > 0 {
                    memory.silence_hold_until = Some(now + snapshot.settings.heartbeat_timeout);
                }
                let holding = memory.silence_hold_until.is_some_and(|until| now < until);
                if holding {
                    actions = without_reaps(actions);
                }
                self.note_mass_silence(&region, holding, silent, memory);
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
                let term = term.clone();
                let name = region.clone();
                let handle = tasks.spawn(async move {
                    let outcome = executor.run(&term, &name, actions, &fleet).await;
                    Report::Region(name, outcome)
                });
                work.insert(handle.id(), Work::Region(region));
            }
        }
        // Let in-flight actions finish (a launch must reach its insert) while the lease lasts;
        // cloud calls already stopped if the term ended.
        let drained = tokio::time::timeout(term.lease_left(), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("scaling tasks still running at the end of the term; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    fn fleet_tag(&self) -> String {
        fleet_name(self.environment)
    }

    /// Rows of another fleet in a region mean two controllers of different environments share
    /// this database: neither may shape the region, so this one leaves it alone and says so.
    fn note_foreign_rows(&self, fleet: &Fleet, region: &str, memory: &mut RegionMemory) {
        let own = self.fleet_tag();
        let foreign: Vec<&str> = fleet
            .instances_in(region)
            .filter_map(|i| i.fleet.as_deref())
            .filter(|other| *other != own)
            .collect();
        let now_foreign = !foreign.is_empty();
        if now_foreign != memory.foreign {
            if now_foreign {
                tracing::error!(
                    region,
                    fleet = own,
                    other = foreign[0],
                    "the region holds hosts of another fleet: this controller neither launches nor destroys anything there"
                );
            } else {
                tracing::info!(
                    region,
                    "no hosts of another fleet left: scaling the region again"
                );
            }
            memory.foreign = now_foreign;
        }
        self.metrics
            .region_paused(region, "foreign_fleet", now_foreign);
    }

    /// Says (once per change) whether reaping is held back in `region` because most of its
    /// hosts fell silent at once (`silent` of them now); the metric follows every decision.
    fn note_mass_silence(
        &self,
        region: &str,
        holding: bool,
        silent: usize,
        memory: &mut RegionMemory,
    ) {
        if holding != memory.mass_silence {
            if holding {
                tracing::error!(
                    region,
                    silent,
                    "most hosts stopped sending heartbeats at once: none is reaped until they beat again or an operator acts"
                );
            } else {
                tracing::info!(region, "hosts beat again: reaping resumes");
            }
            memory.mass_silence = holding;
        }
        self.metrics
            .region_paused(region, "mass_heartbeat_loss", holding);
    }

    /// Reconciles the regions this controller decides for (`only` these, when given), one
    /// after the other.
    fn reconcile_all(
        &self,
        term: &Term,
        fleet: &Fleet,
        regions: &HashMap<String, RegionMemory>,
        only: Option<Vec<String>>,
    ) -> impl Future<Output = Report> + Send + 'static {
        let executor = self.executor.clone();
        let term = term.clone();
        let fleet = fleet.clone();
        let ready_timeout = scaling_settings(&self.settings(&fleet)).instance_ready_timeout;
        let jobs: Vec<(String, HashMap<String, DateTime<Utc>>)> = self
            .regions(&fleet)
            .into_iter()
            .filter(|region| only.as_ref().is_none_or(|only| only.contains(region)))
            .filter(|region| !regions.get(region).is_some_and(|memory| memory.foreign))
            .map(|region| {
                let gone = regions
                    .get(&region)
                    .map(|memory| memory.gone_since.clone())
                    .unwrap_or_default();
                (region, gone)
            })
            .collect();
        let attempted = jobs.len();
        async move {
            let mut results = Vec::new();
            for (region, gone_since) in jobs {
                match executor
                    .reconcile(
                        &term,
                        &region,
                        &fleet,
                        gone_since,
                        term.db_now(),
                        ready_timeout,
                    )
                    .await
                {
                    Ok(result) => results.push((region, result)),
                    Err(error) => {
                        executor.metrics.error("reconcile");
                        tracing::warn!(region, %error, "reconcile failed");
                    }
                }
            }
            Report::Reconciled(results, attempted)
        }
    }

    fn remember(&self, memory: &mut RegionMemory, outcome: &Outcome, now: DateTime<Utc>) {
        memory.busy = false;
        let own = self.fleet_tag();
        memory.launched.extend(
            outcome
                .launched
                .iter()
                .map(|instance| (now, host_view(instance, &Fleet::default(), &own))),
        );
        for instance_type in &outcome.short_of {
            tracing::warn!(
                instance_type,
                "no capacity for this type: trying the next one for a while"
            );
            memory
                .short_of
                .insert(instance_type.clone(), now + CAPACITY_SHORTAGE_MEMORY);
        }
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
            memory.retry_at = Some(now + backoff(memory.failures));
        } else {
            memory.failures = 0;
            memory.retry_at = None;
        }
        if outcome.deferred > 0 {
            // The next destructive pass comes with the next resync, not at once: otherwise the
            // budget per pass would bound nothing.
            let pace = chrono::Duration::from_std(self.resync_interval)
                .unwrap_or(chrono::Duration::minutes(1));
            memory.retry_at = memory.retry_at.max(Some(now + pace));
        }
    }

    fn settings(&self, fleet: &Fleet) -> FleetSettings {
        self.settings
            .clone()
            .or_else(|| fleet.settings.clone())
            .unwrap_or(FleetSettings::DEFAULT)
    }

    /// The regions this controller decides for.
    fn regions(&self, fleet: &Fleet) -> Vec<String> {
        let mut regions = fleet.regions_with_anything();
        if !self.managed_regions.is_empty() {
            regions.retain(|region| self.managed_regions.contains(region));
        }
        regions
    }

    fn record_metrics(&self, snapshot: &RegionSnapshot, now: DateTime<Utc>) {
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
            snapshot.desired_free_at(now),
            free,
            &[
                ("PRE_CONNECTION", count(InstanceStatus::PreConnection)),
                ("ACTIVE", count(InstanceStatus::Active)),
                ("DRAINING", count(InstanceStatus::Draining)),
            ],
        );
    }
}

/// The pause after `failures` failed passes in a row: doubling, capped at a minute.
fn backoff(failures: u32) -> chrono::Duration {
    chrono::Duration::seconds(1 << failures.min(6))
}

/// One region's snapshot from the fleet view plus what this controller remembers.
fn snapshot(
    fleet: &Fleet,
    region: &str,
    environment: Environment,
    memory: &RegionMemory,
) -> RegionSnapshot {
    let config = fleet.regions.get(region);
    let own = fleet_name(environment);
    let mut hosts: Vec<HostView> = fleet
        .instances_in(region)
        .map(|instance| host_view(instance, fleet, &own))
        .collect();
    hosts.extend(memory.launched.iter().map(|(_, host)| host.clone()));
    let settings = fleet.settings.clone().unwrap_or(FleetSettings::DEFAULT);
    let swapped = memory.swapped_to.as_ref().map(|(_, image)| image.clone());
    RegionSnapshot {
        region: region.to_owned(),
        enabled: config.is_some_and(|c| c.enabled),
        desired_free: config.map_or(0, |c| c.desired_free_mandelboxes.max(0) as u32),
        schedule: config.map_or_else(BufferSchedule::default, |config| {
            BufferSchedule::from_rows(
                &config.schedule_time_zone,
                fleet.schedules.get(region).into_iter().flatten(),
            )
        }),
        instance_types: config.map(|c| c.instance_types.clone()).unwrap_or_default(),
        unavailable_types: memory.short_of.keys().cloned().collect(),
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
        schedule_lead: seconds(settings.schedule_lead_seconds),
    }
}

fn host_view(instance: &whist_types::Instance, fleet: &Fleet, own_fleet: &str) -> HostView {
    HostView {
        id: instance.id.clone(),
        image_id: instance.image_id.clone(),
        instance_type: instance.instance_type.clone(),
        status: instance.status,
        capacity: capacity_of(&instance.instance_type),
        remaining: instance.remaining_capacity,
        created_at: instance.created_at,
        heartbeat_at: instance.heartbeat_at,
        owned: instance.fleet.as_deref() == Some(own_fleet),
        idle_since: fleet.idle_since.get(&instance.id).copied(),
    }
}
