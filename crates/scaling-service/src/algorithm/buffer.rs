//! The default algorithm: keep a buffer of free mandelboxes per region.
//!
//! Words used below: a host is *current* when it runs the region's current image; *shielded* when
//! it runs the image of an upgrade in progress (one that is not the current image yet); *dead* when
//! its heartbeat stopped or it never registered. One decision, in order:
//!
//! 1. Dead hosts are terminated and count for nothing else: any host but a PRE_CONNECTION one whose
//!    heartbeat is older than `heartbeat_timeout` ([`TerminateReason::HeartbeatLost`]); a
//!    PRE_CONNECTION host created longer than `instance_ready_timeout` ago
//!    ([`TerminateReason::NeverReady`]) unless it is shielded (the upgrade's deadline handles those).
//! 2. DRAINING hosts without sessions are terminated ([`TerminateReason::Drained`]); with sessions
//!    they are left alone.
//! 3. Free capacity is the free sessions of ACTIVE current hosts plus the capacity of PRE_CONNECTION
//!    current hosts (booting hosts count as coming). Old-image, shielded and DRAINING hosts add
//!    nothing.
//! 4. Below target, once the scale-up cooldown has passed, the whole deficit is launched at once on
//!    the first allowed instance type that holds anything.
//! 5. Above target, once the scale-down cooldown has passed, idle current hosts that have been idle
//!    for `scale_down_delay` are drained, longest idle first, as long as the free capacity stays
//!    strictly above target after each one (a band of one host's worth, so that launching and
//!    draining never alternate).
//! 6. Idle ACTIVE hosts on neither the current image nor the upgrade's are drained at once.
//! 7. A disabled region launches nothing, ignores upgrades and drains every idle ACTIVE host.
//! 8. An upgrade launches a shielded buffer on the new image (`Pending`), then swaps the region's
//!    image once the matching client is published and a new host is ACTIVE, or rolls back if no new
//!    host is ACTIVE by its deadline (`Shielded`).
//!
//! Hosts of no fleet (rows from before fleets were recorded) serve and count as capacity like any
//! other, but are never terminated or drained: only a host of this controller's own fleet is.
//! An instance type the cloud recently had no capacity for is skipped for the next allowed one.
//!
//! A host with sessions is never drained. Actions come out as terminations, drains, launches and
//! then the upgrade's step, hosts sorted by id within a kind, at most one action per host.

use chrono::{DateTime, Duration, Utc};
use whist_types::{InstanceStatus, capacity_of};

use super::{
    Action, DrainReason, HostView, ImageRef, LaunchPurpose, RegionSnapshot, ScalingAlgorithm,
    TerminateReason, UpgradeState, UpgradeView,
};

/// Keeps `desired_free` free sessions on the current image in every enabled region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BufferAlgorithm;

impl BufferAlgorithm {
    pub const fn new() -> Self {
        Self
    }
}

impl ScalingAlgorithm for BufferAlgorithm {
    fn decide(&self, snapshot: &RegionSnapshot, now: DateTime<Utc>) -> Vec<Action> {
        decide(snapshot, now)
    }
}

fn decide(snapshot: &RegionSnapshot, now: DateTime<Utc>) -> Vec<Action> {
    let settings = &snapshot.settings;
    let enabled = snapshot.enabled;
    let current = snapshot.current_image.as_ref();
    let upgrade = active_upgrade(snapshot);

    let mut terminations: Vec<(&str, TerminateReason)> = Vec::new();
    let mut drains: Vec<(&str, DrainReason)> = Vec::new();
    let mut surplus: Vec<&HostView> = Vec::new();
    let mut free: u64 = 0;
    let mut new_host_active = false;

    for host in &snapshot.hosts {
        let is_current = current.is_some_and(|image| host.image_id == image.image_id);
        let is_shielded = upgrade.is_some_and(|upgrade| host.image_id == upgrade.image.image_id);

        // 1. Dead hosts (only this fleet's are terminated; others just count for nothing).
        if host.status == InstanceStatus::PreConnection {
            if !is_shielded && now - host.created_at > settings.instance_ready_timeout {
                if host.owned {
                    terminations.push((&host.id, TerminateReason::NeverReady));
                }
                continue;
            }
        } else if now - host.heartbeat_at > settings.heartbeat_timeout {
            if host.owned {
                terminations.push((&host.id, TerminateReason::HeartbeatLost));
            }
            continue;
        }
        // What follows may drain: a host of no fleet only counts.
        let drainable = host.owned && host.is_idle();

        match host.status {
            // 2. Drained hosts.
            InstanceStatus::Draining => {
                if host.is_idle() && host.owned {
                    terminations.push((&host.id, TerminateReason::Drained));
                }
            }
            // 3. Booting counts as coming.
            InstanceStatus::PreConnection => {
                if is_current {
                    free += u64::from(host.capacity);
                }
            }
            InstanceStatus::Active => {
                new_host_active |= is_shielded;
                if !enabled {
                    // 7. Disabled region.
                    if drainable {
                        drains.push((&host.id, DrainReason::RegionDisabled));
                    }
                } else if is_current {
                    // 3. and candidates for 5.
                    free += free_sessions(host);
                    if drainable
                        && host
                            .idle_since
                            .is_some_and(|since| now - since >= settings.scale_down_delay)
                    {
                        surplus.push(host);
                    }
                } else if !is_shielded && current.is_some() && drainable {
                    // 6. Old images.
                    drains.push((&host.id, DrainReason::OldImage));
                }
            }
        }
    }

    let desired = u64::from(snapshot.desired_free_at(now));
    let mut launches = Vec::new();
    if enabled && let Some(image) = current {
        // 4. Scale up.
        if free < desired
            && cooled_down(snapshot.last_scale_up, settings.scale_up_cooldown, now)
            && let Some((instance_type, capacity)) = launch_type(snapshot)
        {
            launches.push(Action::Launch {
                image: image.clone(),
                instance_type: instance_type.to_owned(),
                count: count_for(desired - free, capacity),
                purpose: LaunchPurpose::Buffer,
            });
        }

        // 5. Scale down surplus.
        if free > desired
            && cooled_down(snapshot.last_scale_down, settings.scale_down_cooldown, now)
        {
            surplus.sort_by(|a, b| {
                a.idle_since
                    .cmp(&b.idle_since)
                    .then_with(|| a.id.cmp(&b.id))
            });
            for host in surplus {
                let worth = free_sessions(host);
                if free.saturating_sub(worth) > desired {
                    drains.push((&host.id, DrainReason::Surplus));
                    free -= worth;
                }
            }
        }
    }

    // 8. Upgrade.
    let mut upgrade_step = None;
    if let Some(upgrade) = upgrade {
        match upgrade.state {
            // A pending upgrade that could not launch by its deadline (no usable type, a
            // launch the cloud keeps refusing) gives up rather than blocking the region.
            UpgradeState::Pending if now >= upgrade.deadline => {
                upgrade_step = Some(Action::RollBackUpgrade {
                    image: upgrade.image.clone(),
                });
            }
            UpgradeState::Pending => {
                if desired > 0
                    && let Some((instance_type, capacity)) = launch_type(snapshot)
                {
                    launches.push(Action::Launch {
                        image: upgrade.image.clone(),
                        instance_type: instance_type.to_owned(),
                        count: count_for(desired, capacity),
                        purpose: LaunchPurpose::Upgrade,
                    });
                }
            }
            UpgradeState::Shielded => {
                let published =
                    snapshot.published_client_sha.as_deref() == Some(&*upgrade.image.client_sha);
                if published && new_host_active {
                    upgrade_step = Some(Action::SwapImage {
                        image: upgrade.image.clone(),
                    });
                } else if now >= upgrade.deadline && !new_host_active {
                    upgrade_step = Some(Action::RollBackUpgrade {
                        image: upgrade.image.clone(),
                    });
                }
            }
        }
    }

    // 9. Output, one action per host at most (a snapshot should not hold one id twice, but if it
    // does, the first termination wins, then the first drain).
    terminations.sort_by(|a, b| a.0.cmp(b.0));
    terminations.dedup_by(|a, b| a.0 == b.0);
    drains.sort_by(|a, b| a.0.cmp(b.0));
    drains.dedup_by(|a, b| a.0 == b.0);
    drains.retain(|(id, _)| {
        terminations
            .binary_search_by(|(terminated, _)| terminated.cmp(id))
            .is_err()
    });

    let mut actions = Vec::with_capacity(terminations.len() + drains.len() + launches.len() + 1);
    actions.extend(
        terminations
            .into_iter()
            .map(|(id, reason)| Action::Terminate {
                instance_id: id.to_owned(),
                reason,
            }),
    );
    actions.extend(drains.into_iter().map(|(id, reason)| Action::Drain {
        instance_id: id.to_owned(),
        reason,
    }));
    actions.extend(launches);
    actions.extend(upgrade_step);
    actions
}

/// The upgrade this decision acts on: none in a disabled region, without a current image, or once
/// the upgrade's image is the current one.
fn active_upgrade(snapshot: &RegionSnapshot) -> Option<&UpgradeView> {
    let current: &ImageRef = snapshot.current_image.as_ref()?;
    snapshot
        .upgrade
        .as_ref()
        .filter(|upgrade| snapshot.enabled && upgrade.image.image_id != current.image_id)
}

/// Free sessions a host offers; a negative count is none.
fn free_sessions(host: &HostView) -> u64 {
    u64::try_from(host.remaining).unwrap_or(0)
}

fn cooled_down(last: Option<DateTime<Utc>>, cooldown: Duration, now: DateTime<Utc>) -> bool {
    last.is_none_or(|last| now - last >= cooldown)
}

/// The first allowed instance type that holds any session and that the cloud has not recently
/// lacked capacity for, with its capacity.
fn launch_type(snapshot: &RegionSnapshot) -> Option<(&str, u32)> {
    snapshot
        .instance_types
        .iter()
        .filter(|name| !snapshot.unavailable_types.contains(name))
        .map(|name| (name.as_str(), capacity_of(name)))
        .find(|(_, capacity)| *capacity > 0)
}

/// Hosts of `capacity` sessions needed for `sessions` sessions.
fn count_for(sessions: u64, capacity: u32) -> u32 {
    u32::try_from(sessions.div_ceil(u64::from(capacity))).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::algorithm::{BufferSchedule, ScalingSettings};
    use DrainReason::{OldImage, RegionDisabled, Surplus};
    use TerminateReason::{Drained, HeartbeatLost, NeverReady};
    use UpgradeState::{Pending, Shielded};

    // ---- builders ----

    const NOW: i64 = 10_000_000;
    const CUR: &str = "ami-current";
    const OLD: &str = "ami-old";
    const NEW: &str = "ami-new";
    const CUR_SHA: &str = "sha-current";
    const NEW_SHA: &str = "sha-new";
    /// One session.
    const CAP1: &str = "g4dn.xlarge";
    /// Two sessions; the default type.
    const CAP2: &str = "g4dn.2xlarge";
    /// Three sessions.
    const CAP3: &str = "g4dn.4xlarge";
    /// Holds nothing.
    const UNKNOWN: &str = "t3.micro";

    // Settings: cooldowns 60 s up / 300 s down, delay 600 s, heartbeat 120 s, ready 900 s.
    const UP_COOLDOWN: i64 = 60;
    const DOWN_COOLDOWN: i64 = 300;
    const DELAY: i64 = 600;
    const HEARTBEAT: i64 = 120;
    const READY: i64 = 900;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::seconds(seconds)
    }

    fn now() -> DateTime<Utc> {
        at(NOW)
    }

    fn ago(seconds: i64) -> DateTime<Utc> {
        at(NOW - seconds)
    }

    fn image(image_id: &str, client_sha: &str) -> ImageRef {
        ImageRef {
            image_id: image_id.to_owned(),
            client_sha: client_sha.to_owned(),
        }
    }

    fn current_image() -> ImageRef {
        image(CUR, CUR_SHA)
    }

    fn new_image() -> ImageRef {
        image(NEW, NEW_SHA)
    }

    /// An ACTIVE, idle host on the current image, of the default type (2 sessions), idle for an
    /// hour, heartbeat now.
    fn active(id: &str) -> HostView {
        HostView {
            id: id.to_owned(),
            image_id: CUR.to_owned(),
            instance_type: CAP2.to_owned(),
            status: InstanceStatus::Active,
            capacity: 2,
            remaining: 2,
            created_at: ago(7200),
            heartbeat_at: now(),
            owned: true,
            idle_since: Some(ago(3600)),
        }
    }

    /// A PRE_CONNECTION host on the current image, launched a minute ago.
    fn booting(id: &str) -> HostView {
        HostView {
            status: InstanceStatus::PreConnection,
            created_at: ago(60),
            heartbeat_at: ago(60),
            idle_since: None,
            ..active(id)
        }
    }

    /// A DRAINING idle host on the current image.
    fn draining(id: &str) -> HostView {
        HostView {
            status: InstanceStatus::Draining,
            ..active(id)
        }
    }

    trait HostExt {
        fn image(self, image_id: &str) -> Self;
        /// Another type; an idle host stays idle (remaining follows the capacity).
        fn of_type(self, instance_type: &str) -> Self;
        /// `used` sessions taken: not idle any more.
        fn busy(self, used: i32) -> Self;
        fn remaining(self, remaining: i32) -> Self;
        fn idle_for(self, seconds: i64) -> Self;
        fn idle_since_unknown(self) -> Self;
        fn heartbeat_ago(self, seconds: i64) -> Self;
        fn created_ago(self, seconds: i64) -> Self;
        /// A row of no fleet (from before fleets were recorded).
        fn unowned(self) -> Self;
    }

    impl HostExt for HostView {
        fn image(self, image_id: &str) -> Self {
            Self {
                image_id: image_id.to_owned(),
                ..self
            }
        }
        fn of_type(self, instance_type: &str) -> Self {
            let capacity = capacity_of(instance_type);
            let used = i32::try_from(self.capacity).unwrap_or(i32::MAX) - self.remaining;
            Self {
                instance_type: instance_type.to_owned(),
                capacity,
                remaining: i32::try_from(capacity).unwrap_or(i32::MAX) - used,
                ..self
            }
        }
        fn busy(self, used: i32) -> Self {
            Self {
                remaining: i32::try_from(self.capacity).unwrap_or(i32::MAX) - used,
                idle_since: None,
                ..self
            }
        }
        fn remaining(self, remaining: i32) -> Self {
            Self { remaining, ..self }
        }
        fn idle_for(self, seconds: i64) -> Self {
            Self {
                idle_since: Some(ago(seconds)),
                ..self
            }
        }
        fn idle_since_unknown(self) -> Self {
            Self {
                idle_since: None,
                ..self
            }
        }
        fn heartbeat_ago(self, seconds: i64) -> Self {
            Self {
                heartbeat_at: ago(seconds),
                ..self
            }
        }
        fn created_ago(self, seconds: i64) -> Self {
            Self {
                created_at: ago(seconds),
                ..self
            }
        }
        fn unowned(self) -> Self {
            Self {
                owned: false,
                ..self
            }
        }
    }

    /// An enabled region on the current image with the client published, wanting 4 free sessions
    /// on the default type (2 sessions), never scaled, no upgrade.
    fn region(hosts: Vec<HostView>) -> RegionSnapshot {
        RegionSnapshot {
            region: "us-east-1".to_owned(),
            enabled: true,
            desired_free: 4,
            schedule: BufferSchedule::default(),
            instance_types: vec![CAP2.to_owned()],
            unavailable_types: Vec::new(),
            current_image: Some(current_image()),
            upgrade: None,
            published_client_sha: Some(CUR_SHA.to_owned()),
            hosts,
            settings: ScalingSettings {
                scale_up_cooldown: Duration::seconds(UP_COOLDOWN),
                scale_down_cooldown: Duration::seconds(DOWN_COOLDOWN),
                scale_down_delay: Duration::seconds(DELAY),
                heartbeat_timeout: Duration::seconds(HEARTBEAT),
                instance_ready_timeout: Duration::seconds(READY),
                schedule_lead: Duration::zero(),
            },
            last_scale_up: None,
            last_scale_down: None,
        }
    }

    trait RegionExt {
        fn desired(self, desired_free: u32) -> Self;
        fn types(self, instance_types: &[&str]) -> Self;
        fn disabled(self) -> Self;
        fn no_image(self) -> Self;
        /// An upgrade to [`new_image`] whose deadline is `deadline_in` seconds from now.
        fn upgrading(self, state: UpgradeState, deadline_in: i64) -> Self;
        fn upgrade_to_current(self) -> Self;
        fn published(self, client_sha: &str) -> Self;
        fn scaled_up_ago(self, seconds: i64) -> Self;
        fn scaled_down_ago(self, seconds: i64) -> Self;
        /// The cloud recently had no capacity for these types.
        fn short_of(self, instance_types: &[&str]) -> Self;
        /// A UTC schedule whose hour of [`now`] has this target.
        fn scheduled(self, target: u32) -> Self;
        /// A UTC schedule whose next hour has this target (and [`now`]'s none).
        fn scheduled_next_hour(self, target: u32) -> Self;
    }

    /// The (weekday, hour) cell of `time` in UTC.
    fn cell(time: DateTime<Utc>, target: u32) -> (u8, u8, u32) {
        use chrono::{Datelike, Timelike};
        (
            time.weekday().number_from_monday() as u8,
            time.hour() as u8,
            target,
        )
    }

    impl RegionExt for RegionSnapshot {
        fn scheduled(self, target: u32) -> Self {
            Self {
                schedule: BufferSchedule::new("UTC", [cell(now(), target)]),
                ..self
            }
        }
        fn scheduled_next_hour(self, target: u32) -> Self {
            let next = now() + Duration::hours(1);
            Self {
                schedule: BufferSchedule::new("UTC", [cell(next, target)]),
                ..self
            }
        }
        fn short_of(self, instance_types: &[&str]) -> Self {
            Self {
                unavailable_types: instance_types.iter().map(|t| (*t).to_owned()).collect(),
                ..self
            }
        }
        fn desired(self, desired_free: u32) -> Self {
            Self {
                desired_free,
                ..self
            }
        }
        fn types(self, instance_types: &[&str]) -> Self {
            Self {
                instance_types: instance_types.iter().map(|&t| t.to_owned()).collect(),
                ..self
            }
        }
        fn disabled(self) -> Self {
            Self {
                enabled: false,
                ..self
            }
        }
        fn no_image(self) -> Self {
            Self {
                current_image: None,
                ..self
            }
        }
        fn upgrading(self, state: UpgradeState, deadline_in: i64) -> Self {
            Self {
                upgrade: Some(UpgradeView {
                    image: new_image(),
                    state,
                    deadline: at(NOW + deadline_in),
                }),
                ..self
            }
        }
        fn upgrade_to_current(self) -> Self {
            Self {
                upgrade: Some(UpgradeView {
                    image: current_image(),
                    state: UpgradeState::Pending,
                    deadline: ago(1),
                }),
                ..self
            }
        }
        fn published(self, client_sha: &str) -> Self {
            Self {
                published_client_sha: Some(client_sha.to_owned()),
                ..self
            }
        }
        fn scaled_up_ago(self, seconds: i64) -> Self {
            Self {
                last_scale_up: Some(ago(seconds)),
                ..self
            }
        }
        fn scaled_down_ago(self, seconds: i64) -> Self {
            Self {
                last_scale_down: Some(ago(seconds)),
                ..self
            }
        }
    }

    fn launch(instance_type: &str, count: u32) -> Action {
        Action::Launch {
            image: current_image(),
            instance_type: instance_type.to_owned(),
            count,
            purpose: LaunchPurpose::Buffer,
        }
    }

    fn launch_upgrade(instance_type: &str, count: u32) -> Action {
        Action::Launch {
            image: new_image(),
            instance_type: instance_type.to_owned(),
            count,
            purpose: LaunchPurpose::Upgrade,
        }
    }

    fn drain(id: &str, reason: DrainReason) -> Action {
        Action::Drain {
            instance_id: id.to_owned(),
            reason,
        }
    }

    fn terminate(id: &str, reason: TerminateReason) -> Action {
        Action::Terminate {
            instance_id: id.to_owned(),
            reason,
        }
    }

    fn swap() -> Action {
        Action::SwapImage { image: new_image() }
    }

    fn rollback() -> Action {
        Action::RollBackUpgrade { image: new_image() }
    }

    struct Case {
        name: &'static str,
        snapshot: RegionSnapshot,
        now: DateTime<Utc>,
        expected: Vec<Action>,
    }

    fn case(name: &'static str, snapshot: RegionSnapshot, expected: Vec<Action>) -> Case {
        Case {
            name,
            snapshot,
            now: now(),
            expected,
        }
    }

    // ---- the table ----

    fn cases() -> Vec<Case> {
        vec![
            // Scale up (rule 4) and free capacity (rule 3).
            case(
                "empty region from zero: desired 4, capacity 2 -> one launch of 2",
                region(vec![]),
                vec![launch(CAP2, 2)],
            ),
            case(
                "at target: nothing",
                region(vec![active("a"), active("b")]),
                vec![],
            ),
            case(
                "booting hosts count as coming: no second launch",
                region(vec![booting("a"), booting("b")]),
                vec![],
            ),
            case(
                "booting plus idle reach the target",
                region(vec![active("a"), booting("b")]),
                vec![],
            ),
            case(
                "deficit 5 with capacity 3 -> count 2",
                region(vec![]).types(&[CAP3]).desired(5),
                vec![launch(CAP3, 2)],
            ),
            case(
                "partial deficit rounds up: free 1 of 4 -> 2 hosts of 2",
                region(vec![active("a").busy(1)]),
                vec![launch(CAP2, 2)],
            ),
            case(
                "busy hosts' free sessions count",
                region(vec![active("a").of_type(CAP3).busy(1), active("b")]),
                vec![],
            ),
            case(
                "negative remaining counts as zero",
                region(vec![active("a").remaining(-3), active("b")]),
                vec![launch(CAP2, 1)],
            ),
            case(
                "scale-up cooldown blocks a launch",
                region(vec![]).scaled_up_ago(UP_COOLDOWN - 1),
                vec![],
            ),
            case(
                "scale-up cooldown just passed",
                region(vec![]).scaled_up_ago(UP_COOLDOWN),
                vec![launch(CAP2, 2)],
            ),
            case(
                "first type with capacity is used, unknown type skipped",
                region(vec![]).types(&[UNKNOWN, CAP3, CAP2]),
                vec![launch(CAP3, 2)],
            ),
            case(
                "no type with capacity -> no launch",
                region(vec![]).types(&[UNKNOWN]),
                vec![],
            ),
            case(
                "no capacity for the first type: the next allowed one launches",
                region(vec![]).types(&[CAP2, CAP3]).short_of(&[CAP2]),
                vec![launch(CAP3, 2)],
            ),
            case(
                "no capacity for any allowed type: nothing launches",
                region(vec![]).types(&[CAP2, CAP3]).short_of(&[CAP3, CAP2]),
                vec![],
            ),
            case(
                "a host of no fleet counts as capacity",
                region(vec![active("a").unowned(), active("b")]),
                vec![],
            ),
            case(
                "a dead host of no fleet is not terminated, and not counted",
                region(vec![
                    active("a").unowned().heartbeat_ago(HEARTBEAT + 1),
                    active("b"),
                ]),
                vec![launch(CAP2, 1)],
            ),
            case(
                "a host of no fleet that never registered is not terminated",
                region(vec![
                    booting("a").unowned().created_ago(READY + 1),
                    active("b"),
                    active("c"),
                ]),
                vec![],
            ),
            case(
                "an empty DRAINING host of no fleet is not terminated",
                region(vec![draining("a").unowned(), active("b"), active("c")]),
                vec![],
            ),
            case(
                "surplus never drains a host of no fleet",
                region(vec![
                    active("a").unowned(),
                    active("b").unowned(),
                    active("c"),
                    active("d").unowned(),
                ])
                .desired(2),
                vec![drain("c", Surplus)],
            ),
            case(
                "a host of no fleet on an old image is not drained",
                region(vec![
                    active("a").unowned().image(OLD),
                    active("b"),
                    active("c"),
                ]),
                vec![],
            ),
            case(
                "a disabled region drains only its own fleet's idle hosts",
                region(vec![active("a").unowned(), active("b")]).disabled(),
                vec![drain("b", RegionDisabled)],
            ),
            case(
                "no allowed type -> no launch",
                region(vec![]).types(&[]),
                vec![],
            ),
            case(
                "desired 0 and nothing: nothing",
                region(vec![]).desired(0),
                vec![],
            ),
            case(
                "unknown current image: no launch, no old-image drains",
                region(vec![active("a").image(OLD), active("b").image(OLD).busy(1)]).no_image(),
                vec![],
            ),
            // Dead hosts (rule 1).
            case(
                "dead heartbeat: terminated and not counted",
                region(vec![active("a").heartbeat_ago(HEARTBEAT + 1), active("b")]),
                vec![terminate("a", HeartbeatLost), launch(CAP2, 1)],
            ),
            case(
                "heartbeat exactly at the timeout is alive",
                region(vec![active("a").heartbeat_ago(HEARTBEAT), active("b")]),
                vec![],
            ),
            case(
                "dead heartbeat on any status, sessions or not",
                region(vec![
                    draining("d").busy(1).heartbeat_ago(HEARTBEAT + 1),
                    active("a").busy(2).heartbeat_ago(HEARTBEAT + 1),
                    active("o").image(OLD).heartbeat_ago(HEARTBEAT + 1),
                ])
                .desired(0),
                vec![
                    terminate("a", HeartbeatLost),
                    terminate("d", HeartbeatLost),
                    terminate("o", HeartbeatLost),
                ],
            ),
            case(
                "PRE_CONNECTION ignores its heartbeat within the ready timeout",
                region(vec![
                    booting("a").created_ago(READY).heartbeat_ago(READY),
                    active("b"),
                ]),
                vec![],
            ),
            case(
                "never-ready PRE_CONNECTION: terminated and not counted",
                region(vec![booting("a").created_ago(READY + 1), active("b")]),
                vec![terminate("a", NeverReady), launch(CAP2, 1)],
            ),
            case(
                "never-ready old-image PRE_CONNECTION is terminated too",
                region(vec![
                    booting("a").image(OLD).created_ago(READY + 1),
                    active("b"),
                    active("c"),
                ]),
                vec![terminate("a", NeverReady)],
            ),
            case(
                "shielded PRE_CONNECTION past the ready timeout is left to the deadline",
                region(vec![
                    booting("n").image(NEW).created_ago(READY * 2),
                    active("a"),
                    active("b"),
                ])
                .upgrading(Shielded, 60),
                vec![],
            ),
            case(
                "shielded ACTIVE host with a lost heartbeat is terminated",
                region(vec![
                    active("n").image(NEW).heartbeat_ago(HEARTBEAT + 1),
                    active("a"),
                    active("b"),
                ])
                .upgrading(Shielded, 60),
                vec![terminate("n", HeartbeatLost)],
            ),
            // Drained hosts (rule 2).
            case(
                "idle DRAINING host is terminated; DRAINING with sessions kept",
                region(vec![
                    draining("d1"),
                    draining("d2").busy(1),
                    draining("d3").image(OLD),
                    active("a"),
                    active("b"),
                ]),
                vec![terminate("d1", Drained), terminate("d3", Drained)],
            ),
            case(
                "DRAINING hosts' free sessions do not count",
                region(vec![draining("d").busy(1), active("a")]),
                vec![launch(CAP2, 1)],
            ),
            // Scale down (rule 5).
            case(
                "surplus: longest idle drained first, only while above target + one host",
                region(vec![
                    active("a").idle_for(1000),
                    active("b").idle_for(5000),
                    active("c").idle_for(2000),
                    active("d").idle_for(3000),
                ]),
                vec![drain("b", Surplus)],
            ),
            case(
                "hysteresis: free == desired + capacity -> no drain",
                region(vec![active("a"), active("b"), active("c")]),
                vec![],
            ),
            case(
                "hysteresis: free == desired + capacity + 1 -> one drain, then stable",
                region(vec![
                    active("a").idle_for(4000),
                    active("b").idle_for(3000),
                    active("c").idle_for(2000),
                    active("s").of_type(CAP1).idle_for(1000),
                ]),
                vec![drain("a", Surplus)],
            ),
            case(
                "hysteresis: a one-session host drained when free is desired + 3",
                region(vec![
                    active("s").of_type(CAP1).idle_for(9000),
                    active("a").idle_for(4000),
                    active("b").idle_for(3000),
                    active("c").idle_for(2000),
                ]),
                vec![drain("s", Surplus)],
            ),
            case(
                "surplus ties broken by id; several drains sorted by id",
                region(vec![active("c"), active("a"), active("b")]).desired(0),
                vec![drain("a", Surplus), drain("b", Surplus)],
            ),
            case(
                "scale-down delay not met",
                region(vec![
                    active("a").idle_for(DELAY - 1),
                    active("b").idle_for(DELAY - 1),
                    active("c").idle_for(DELAY - 1),
                    active("d").idle_for(DELAY - 1),
                ]),
                vec![],
            ),
            case(
                "scale-down delay just met",
                region(vec![
                    active("a").idle_for(DELAY - 1),
                    active("b").idle_for(DELAY - 1),
                    active("c").idle_for(DELAY - 1),
                    active("d").idle_for(DELAY),
                ]),
                vec![drain("d", Surplus)],
            ),
            case(
                "idle host without idle_since is not a surplus candidate",
                region(vec![
                    active("a").idle_since_unknown(),
                    active("b").idle_since_unknown(),
                    active("c"),
                    active("d"),
                ]),
                vec![drain("c", Surplus)],
            ),
            case(
                "scale-down cooldown blocks drains",
                region(vec![active("a"), active("b"), active("c"), active("d")])
                    .scaled_down_ago(DOWN_COOLDOWN - 1),
                vec![],
            ),
            case(
                "scale-down cooldown just passed",
                region(vec![active("a"), active("b"), active("c"), active("d")])
                    .scaled_down_ago(DOWN_COOLDOWN),
                vec![drain("a", Surplus)],
            ),
            case(
                "surplus never drains a host with sessions",
                region(vec![
                    active("a").of_type(CAP3).busy(1),
                    active("b").of_type(CAP3).busy(1),
                    active("c").of_type(CAP3).busy(1),
                ])
                .desired(0),
                vec![],
            ),
            case(
                "surplus counts booting hosts but never drains them",
                region(vec![
                    booting("p1"),
                    booting("p2"),
                    booting("p3"),
                    active("a"),
                ]),
                vec![drain("a", Surplus)],
            ),
            // Old images (rule 6).
            case(
                "old image: idle drained at once, with sessions kept, booting kept, none counted",
                region(vec![
                    active("o1").image(OLD).idle_since_unknown(),
                    active("o2").image(OLD).busy(1),
                    booting("o3").image(OLD),
                    active("a"),
                ])
                .scaled_down_ago(1)
                .scaled_up_ago(1),
                vec![drain("o1", OldImage)],
            ),
            case(
                "old image drained while the region launches on the current one",
                region(vec![active("o").image(OLD)]),
                vec![drain("o", OldImage), launch(CAP2, 2)],
            ),
            // Disabled region (rule 7).
            case(
                "disabled region: no launch, every idle ACTIVE host drained, sessions kept",
                region(vec![
                    active("a"),
                    active("b").busy(1),
                    active("c").image(OLD),
                    active("e").idle_for(1),
                    booting("p"),
                    draining("d"),
                    draining("f").busy(1),
                ])
                .disabled(),
                vec![
                    terminate("d", Drained),
                    drain("a", RegionDisabled),
                    drain("c", RegionDisabled),
                    drain("e", RegionDisabled),
                ],
            ),
            case(
                "disabled region ignores upgrades and drains shielded hosts",
                region(vec![
                    active("n").image(NEW),
                    booting("m").image(NEW).created_ago(READY + 1),
                ])
                .disabled()
                .upgrading(Pending, -1),
                vec![terminate("m", NeverReady), drain("n", RegionDisabled)],
            ),
            case(
                "disabled region with a shielded upgrade past its deadline: no rollback",
                region(vec![]).disabled().upgrading(Shielded, -1),
                vec![],
            ),
            // Upgrades (rule 8).
            case(
                "pending upgrade launches a shielded buffer",
                region(vec![active("a"), active("b")]).upgrading(Pending, 3600),
                vec![launch_upgrade(CAP2, 2)],
            ),
            case(
                "pending upgrade: deficit 5 with capacity 3 -> 2, beside the buffer's launch",
                region(vec![])
                    .types(&[UNKNOWN, CAP3])
                    .desired(5)
                    .upgrading(Pending, 3600),
                vec![launch(CAP3, 2), launch_upgrade(CAP3, 2)],
            ),
            case(
                "pending upgrade with desired 0 launches nothing",
                region(vec![]).desired(0).upgrading(Pending, 3600),
                vec![],
            ),
            case(
                "pending upgrade with no usable type launches nothing",
                region(vec![]).types(&[UNKNOWN]).upgrading(Pending, 3600),
                vec![],
            ),
            case(
                "pending upgrade past its deadline is rolled back instead of launched",
                region(vec![active("a"), active("b")]).upgrading(Pending, -1),
                vec![Action::RollBackUpgrade { image: new_image() }],
            ),
            case(
                "shielded hosts neither drained nor counted",
                region(vec![
                    active("n1").image(NEW),
                    active("n2").image(NEW),
                    booting("n3").image(NEW),
                ])
                .upgrading(Shielded, 3600),
                vec![launch(CAP2, 2)],
            ),
            case(
                "swap when the client is published and a new host is ACTIVE",
                region(vec![
                    active("n").image(NEW).busy(1),
                    booting("m").image(NEW),
                ])
                .upgrading(Shielded, 3600)
                .published(NEW_SHA)
                .desired(0),
                vec![swap()],
            ),
            case(
                "swap even past the deadline once published",
                region(vec![active("n").image(NEW)])
                    .upgrading(Shielded, -10)
                    .published(NEW_SHA)
                    .desired(0),
                vec![swap()],
            ),
            case(
                "no swap before the client is published",
                region(vec![active("n").image(NEW)])
                    .upgrading(Shielded, 3600)
                    .desired(0),
                vec![],
            ),
            case(
                "no swap while no new host is ACTIVE",
                region(vec![booting("n").image(NEW)])
                    .upgrading(Shielded, 3600)
                    .published(NEW_SHA)
                    .desired(0),
                vec![],
            ),
            case(
                "rollback at the deadline when no new host is ACTIVE",
                region(vec![booting("n").image(NEW).created_ago(READY * 3)])
                    .upgrading(Shielded, 0)
                    .desired(0),
                vec![rollback()],
            ),
            case(
                "no rollback before the deadline",
                region(vec![booting("n").image(NEW)])
                    .upgrading(Shielded, 1)
                    .desired(0),
                vec![],
            ),
            case(
                "no rollback when a new host is ACTIVE",
                region(vec![active("n").image(NEW)])
                    .upgrading(Shielded, -3600)
                    .desired(0),
                vec![],
            ),
            case(
                "a dead new host is not ACTIVE: terminated and rolled back",
                region(vec![active("n").image(NEW).heartbeat_ago(HEARTBEAT + 1)])
                    .upgrading(Shielded, -1)
                    .published(NEW_SHA)
                    .desired(0),
                vec![terminate("n", HeartbeatLost), rollback()],
            ),
            case(
                "upgrade to the current image is no upgrade",
                region(vec![
                    active("a"),
                    active("b"),
                    booting("c").created_ago(READY + 1),
                ])
                .upgrade_to_current(),
                vec![terminate("c", NeverReady)],
            ),
            case(
                "upgrade without a current image is ignored",
                region(vec![booting("n").image(NEW).created_ago(READY + 1)])
                    .no_image()
                    .upgrading(Shielded, -1),
                vec![terminate("n", NeverReady)],
            ),
            // Output (rule 9).
            case(
                "order: terminations, drains, launches, then the upgrade's step",
                region(vec![
                    active("z").heartbeat_ago(HEARTBEAT + 1),
                    active("y").image(OLD),
                    active("n").image(NEW),
                    draining("a"),
                    active("b").image(OLD),
                ])
                .desired(2)
                .upgrading(Shielded, 3600)
                .published(NEW_SHA),
                vec![
                    terminate("a", Drained),
                    terminate("z", HeartbeatLost),
                    drain("b", OldImage),
                    drain("y", OldImage),
                    launch(CAP2, 1),
                    swap(),
                ],
            ),
            case(
                "one action per host even when a snapshot repeats an id",
                region(vec![
                    active("a").image(OLD).heartbeat_ago(HEARTBEAT + 1),
                    active("a").image(OLD),
                    active("b").image(OLD),
                    active("b").image(OLD),
                ])
                .desired(0),
                vec![terminate("a", HeartbeatLost), drain("b", OldImage)],
            ),
            // Scheduled buffers: the target of the hour, under the same cooldowns.
            case(
                "a scheduled hour above the default launches up to it",
                region(vec![]).desired(0).scheduled(4),
                vec![launch(CAP2, 2)],
            ),
            case(
                "the scale-up cooldown holds a scheduled rise back",
                region(vec![])
                    .desired(0)
                    .scheduled(4)
                    .scaled_up_ago(UP_COOLDOWN - 1),
                vec![],
            ),
            case(
                "a scheduled hour below the default drains the idle surplus",
                region(vec![active("a"), active("b"), active("c"), active("d")])
                    .desired(8)
                    .scheduled(2),
                vec![
                    drain("a", DrainReason::Surplus),
                    drain("b", DrainReason::Surplus),
                ],
            ),
            case(
                "the scale-down cooldown holds a scheduled fall back",
                region(vec![active("a"), active("b"), active("c"), active("d")])
                    .desired(8)
                    .scheduled(2)
                    .scaled_down_ago(DOWN_COOLDOWN - 1),
                vec![],
            ),
            case(
                "a scheduled rise is launched its lead before its hour",
                RegionSnapshot {
                    settings: ScalingSettings {
                        schedule_lead: Duration::hours(1),
                        ..region(vec![]).settings
                    },
                    ..region(vec![]).desired(0).scheduled_next_hour(4)
                },
                vec![launch(CAP2, 2)],
            ),
            case(
                "an hour without a target of its own keeps the default",
                region(vec![]).scheduled_next_hour(10),
                vec![launch(CAP2, 2)],
            ),
            case(
                "a schedule in a zone this build does not know keeps the default",
                RegionSnapshot {
                    schedule: BufferSchedule::new("Nowhere/Atlantis", [cell(now(), 10)]),
                    ..region(vec![])
                },
                vec![launch(CAP2, 2)],
            ),
        ]
    }

    #[test]
    fn table() {
        let algorithm = BufferAlgorithm::new();
        let cases = cases();
        let mut names = HashSet::new();
        let mut failures = Vec::new();
        for case in &cases {
            assert!(
                names.insert(case.name),
                "duplicate case name: {}",
                case.name
            );
            let actual = algorithm.decide(&case.snapshot, case.now);
            if actual != case.expected {
                failures.push(format!(
                    "{}\n  expected: {:?}\n  actual:   {:?}",
                    case.name, case.expected, actual
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }

    /// Invariants over random regions: at most one action per host, never a drain of a host that
    /// is not ACTIVE and idle, kinds in order, at most one launch per purpose, and the same answer
    /// twice.
    #[test]
    fn invariants_hold_on_random_regions() {
        let mut rng = fastrand::Rng::with_seed(7);
        let images = [CUR, OLD, NEW];
        let types = [CAP1, CAP2, CAP3, UNKNOWN];
        let statuses = InstanceStatus::ALL;
        for round in 0..2000 {
            let hosts: Vec<HostView> = (0..rng.usize(0..12))
                .map(|n| {
                    let instance_type = types[rng.usize(..types.len())];
                    let capacity = capacity_of(instance_type);
                    let remaining = rng.i32(-1..=i32::try_from(capacity).unwrap_or(0));
                    HostView {
                        id: format!("h{}", rng.usize(0..n + 2)),
                        image_id: images[rng.usize(..images.len())].to_owned(),
                        instance_type: instance_type.to_owned(),
                        status: statuses[rng.usize(..statuses.len())],
                        capacity,
                        remaining,
                        created_at: ago(rng.i64(0..2 * READY)),
                        heartbeat_at: ago(rng.i64(0..2 * HEARTBEAT)),
                        owned: rng.u8(..4) != 0,
                        idle_since: rng.bool().then(|| ago(rng.i64(0..2 * DELAY))),
                    }
                })
                .collect();
            let mut snapshot = region(hosts).desired(rng.u32(0..10));
            if rng.bool() {
                snapshot = snapshot.upgrading(
                    if rng.bool() { Pending } else { Shielded },
                    rng.i64(-100..100),
                );
            }
            if rng.u8(..10) == 0 {
                snapshot = snapshot.disabled();
            }
            if rng.u8(..10) == 0 {
                snapshot = snapshot.no_image();
            }
            if rng.bool() {
                snapshot = snapshot.published(NEW_SHA);
            }
            let actions = decide(&snapshot, now());
            assert_eq!(actions, decide(&snapshot, now()), "round {round}");

            let mut acted = HashSet::new();
            let mut last_kind = 0;
            let mut purposes = Vec::new();
            for action in &actions {
                let kind = match action {
                    Action::Terminate { .. } => 0,
                    Action::Drain { .. } => 1,
                    Action::Launch { .. } => 2,
                    Action::SwapImage { .. } | Action::RollBackUpgrade { .. } => 3,
                };
                assert!(kind >= last_kind, "round {round}: order {actions:?}");
                last_kind = kind;
                match action {
                    Action::Terminate { instance_id, .. } => {
                        assert!(
                            acted.insert(instance_id.clone()),
                            "round {round}: {actions:?}"
                        );
                        assert!(
                            snapshot
                                .hosts
                                .iter()
                                .any(|host| &host.id == instance_id && host.owned),
                            "round {round}: terminated a host of no fleet: {actions:?}"
                        );
                    }
                    Action::Drain { instance_id, .. } => {
                        assert!(
                            acted.insert(instance_id.clone()),
                            "round {round}: {actions:?}"
                        );
                        assert!(
                            snapshot
                                .hosts
                                .iter()
                                .any(|host| &host.id == instance_id && host.owned),
                            "round {round}: drained a host of no fleet: {actions:?}"
                        );
                        assert!(
                            snapshot.hosts.iter().any(|host| &host.id == instance_id
                                && host.status == InstanceStatus::Active
                                && host.is_idle()),
                            "round {round}: drained a busy host: {actions:?}"
                        );
                    }
                    Action::Launch { purpose, count, .. } => {
                        assert!(snapshot.enabled && *count > 0, "round {round}: {actions:?}");
                        assert!(!purposes.contains(purpose), "round {round}: {actions:?}");
                        purposes.push(*purpose);
                    }
                    Action::SwapImage { .. } | Action::RollBackUpgrade { .. } => {
                        assert!(snapshot.enabled, "round {round}: {actions:?}");
                    }
                }
            }
        }
    }
}
