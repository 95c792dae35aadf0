//! The fleet as this replica sees it: every live query's latest result in memory, so a scaling
//! decision costs no query at all. It follows instances (state and remaining capacity), not
//! their boxes: assigns are decided inside the database, and a result set of every WAITING box
//! would grow with the fleet and be re-sent on every claim.
//!
//! [`FleetView`] owns the live queries and publishes a new [`Fleet`] (an immutable, cheaply
//! cloned value) after every change; readers take the current one and never wait on writers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use whist_dbclient::{ConnectionState, HasuraClient, LiveOptions, live};
use whist_types::{
    DesktopAppVersion, FleetSettings, Image, ImageUpgrade, Instance, InstanceStatus, RegionConfig,
    ScheduledBuffer, capacity_of,
};

/// One consistent-enough picture of the fleet (each part is the latest of its live query).
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub instances: Arc<Vec<Instance>>,
    /// Images by region (provider AWS).
    pub images: Arc<BTreeMap<String, Image>>,
    pub regions: Arc<BTreeMap<String, RegionConfig>>,
    pub settings: Option<FleetSettings>,
    pub desktop_app_version: Option<DesktopAppVersion>,
    /// Buffer schedules by region, hour by hour (regions without one are absent).
    pub schedules: Arc<BTreeMap<String, Vec<ScheduledBuffer>>>,
    /// Upgrades in progress, by region.
    pub upgrades: Arc<BTreeMap<String, ImageUpgrade>>,
    /// Since when each instance has had no session (instances with sessions are absent).
    pub idle_since: Arc<HashMap<String, DateTime<Utc>>>,
    /// Every live query has delivered at least once.
    pub complete: bool,
}

impl Fleet {
    pub fn instances_in<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a Instance> {
        self.instances.iter().filter(move |i| i.region == region)
    }

    pub fn regions_with_anything(&self) -> Vec<String> {
        let mut regions: HashSet<String> = self.regions.keys().cloned().collect();
        regions.extend(self.instances.iter().map(|i| i.region.clone()));
        regions.extend(self.upgrades.keys().cloned());
        let mut regions: Vec<String> = regions.into_iter().collect();
        regions.sort();
        regions
    }
}

/// Publishes the fleet; cheap to clone.
#[derive(Debug, Clone)]
pub struct FleetView {
    current: watch::Receiver<Fleet>,
    states: Arc<Mutex<Vec<watch::Receiver<ConnectionState>>>>,
}

impl FleetView {
    pub fn current(&self) -> Fleet {
        self.current.borrow().clone()
    }

    /// Resolves whenever the fleet changed.
    pub fn changes(&self) -> watch::Receiver<Fleet> {
        self.current.clone()
    }

    /// Every live query is connected.
    pub fn live(&self) -> bool {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(|state| *state.borrow() == ConnectionState::Live)
    }

    /// Starts the live queries; they run until `stop`.
    pub fn start(db: &HasuraClient, options: LiveOptions, stop: CancellationToken) -> Self {
        let (publish, current) = watch::channel(Fleet::default());
        let mut instances = db.subscribe_with(live::queries::instances(), options.clone());
        let mut images = db.subscribe_with(live::queries::images(), options.clone());
        let mut regions = db.subscribe_with(live::queries::region_configs(), options.clone());
        let mut settings = db.subscribe_with(live::queries::fleet_settings(), options.clone());
        let mut version = db.subscribe_with(live::queries::desktop_app_version(), options.clone());
        let mut schedules = db.subscribe_with(live::queries::region_schedules(), options.clone());
        let mut upgrades = db.subscribe_with(live::queries::upgrades_in_progress(), options);
        let states = vec![
            instances.state_watch(),
            images.state_watch(),
            regions.state_watch(),
            settings.state_watch(),
            version.state_watch(),
            upgrades.state_watch(),
            schedules.state_watch(),
        ];
        tokio::spawn(async move {
            let mut seen = [false; 7];
            loop {
                let mut fleet = publish.borrow().clone();
                tokio::select! {
                    () = stop.cancelled() => return,
                    Some(snapshot) = instances.next() => {
                        seen[0] = true;
                        fleet.idle_since = Arc::new(track_idle(&fleet.idle_since, &snapshot.rows, Utc::now()));
                        fleet.instances = snapshot.rows;
                    }
                    Some(snapshot) = images.next() => {
                        seen[1] = true;
                        fleet.images = Arc::new(
                            snapshot.rows.iter().filter(|i| i.provider == whist_types::PROVIDER_AWS)
                                .map(|i| (i.region.clone(), i.clone())).collect(),
                        );
                    }
                    Some(snapshot) = regions.next() => {
                        seen[2] = true;
                        fleet.regions = Arc::new(snapshot.rows.iter().map(|r| (r.region.clone(), r.clone())).collect());
                    }
                    Some(snapshot) = settings.next() => {
                        seen[3] = true;
                        fleet.settings = snapshot.rows.first().cloned();
                    }
                    Some(snapshot) = version.next() => {
                        seen[4] = true;
                        fleet.desktop_app_version = snapshot.rows.first().cloned();
                    }
                    Some(snapshot) = upgrades.next() => {
                        seen[5] = true;
                        fleet.upgrades = Arc::new(snapshot.rows.iter().map(|u| (u.region.clone(), u.clone())).collect());
                    }
                    Some(snapshot) = schedules.next() => {
                        seen[6] = true;
                        let mut by_region: BTreeMap<String, Vec<ScheduledBuffer>> = BTreeMap::new();
                        for cell in snapshot.rows.iter() {
                            by_region.entry(cell.region.clone()).or_default().push(cell.clone());
                        }
                        fleet.schedules = Arc::new(by_region);
                    }
                }
                fleet.complete = seen.iter().all(|&s| s);
                publish.send_replace(fleet);
            }
        });
        Self {
            current,
            states: Arc::new(Mutex::new(states)),
        }
    }

    /// Waits until every live query has delivered once (or `timeout`).
    pub async fn wait_complete(&self, timeout: Duration) -> bool {
        let mut changes = self.changes();
        tokio::time::timeout(timeout, async {
            loop {
                if changes.borrow_and_update().complete {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }
}

/// Keeps the first moment each instance was seen idle; forgets instances with sessions.
fn track_idle(
    previous: &HashMap<String, DateTime<Utc>>,
    instances: &[Instance],
    now: DateTime<Utc>,
) -> HashMap<String, DateTime<Utc>> {
    instances
        .iter()
        .filter(|instance| {
            instance.status == InstanceStatus::Active
                && whist_types::is_idle(
                    instance.remaining_capacity,
                    capacity_of(&instance.instance_type),
                )
        })
        .map(|instance| {
            let since = previous.get(&instance.id).copied().unwrap_or(now);
            (instance.id.clone(), since)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, remaining: i32) -> Instance {
        Instance {
            id: id.into(),
            provider: "AWS".into(),
            region: "r".into(),
            image_id: "ami".into(),
            client_sha: "sha".into(),
            ip_addr: None,
            instance_type: "g4dn.2xlarge".into(),
            remaining_capacity: remaining,
            status: InstanceStatus::Active,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            fleet: None,
            heartbeat_at: Utc::now(),
            tls_fingerprint: None,
        }
    }

    #[test]
    fn idleness_keeps_its_first_moment_and_ends_with_a_session() {
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(60);
        let first = track_idle(&HashMap::new(), &[instance("a", 2), instance("b", 1)], t0);
        assert_eq!(first.get("a"), Some(&t0));
        assert!(!first.contains_key("b"), "b has a session");
        let second = track_idle(&first, &[instance("a", 2), instance("b", 2)], t1);
        assert_eq!(second.get("a"), Some(&t0), "still idle since t0");
        assert_eq!(second.get("b"), Some(&t1));
        let third = track_idle(&second, &[instance("a", 1)], t1);
        assert!(third.is_empty());
    }
}
