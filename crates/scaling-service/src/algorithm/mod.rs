//! Scaling decisions: a pure function from one region's snapshot to the actions that bring it to
//! its target. Nothing here performs I/O; the executor carries actions out.

pub mod buffer;
pub mod schedule;

use chrono::{DateTime, Utc};
use whist_types::InstanceStatus;

pub use self::buffer::BufferAlgorithm;
pub use self::schedule::BufferSchedule;

/// Decides what one region needs now. Implementations are pure and synchronous.
pub trait ScalingAlgorithm: Send + Sync + std::fmt::Debug {
    fn decide(&self, snapshot: &RegionSnapshot, now: DateTime<Utc>) -> Vec<Action>;
}

/// Everything a decision about one region may depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSnapshot {
    pub region: String,
    /// Disabled regions get no new capacity; their idle hosts are drained.
    pub enabled: bool,
    /// Target number of free (WAITING-capable) mandelboxes on the current image, for every hour
    /// the schedule leaves out.
    pub desired_free: u32,
    /// Targets by hour of the week (see [`RegionSnapshot::desired_free_at`]).
    pub schedule: BufferSchedule,
    /// Instance types allowed in this region, in order of preference.
    pub instance_types: Vec<String>,
    /// Allowed types the cloud recently had no capacity for: launches fall back to the next.
    pub unavailable_types: Vec<String>,
    /// The region's current image (`whist.images`); `None` means nothing can be launched.
    pub current_image: Option<ImageRef>,
    /// An image upgrade in progress for this region, if any.
    pub upgrade: Option<UpgradeView>,
    /// The client commit published for this environment (the desktop app version).
    pub published_client_sha: Option<String>,
    pub hosts: Vec<HostView>,
    pub settings: ScalingSettings,
    /// When this region last launched hosts for its buffer / last drained hosts for surplus.
    pub last_scale_up: Option<DateTime<Utc>>,
    pub last_scale_down: Option<DateTime<Utc>>,
}

impl RegionSnapshot {
    /// The target at `now`: the schedule's for that hour of the week, else `desired_free`; a
    /// rise within the schedule lead already counts (its hosts must boot first).
    pub fn desired_free_at(&self, now: DateTime<Utc>) -> u32 {
        self.schedule
            .target_ahead(self.desired_free, now, self.settings.schedule_lead)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub image_id: String,
    pub client_sha: String,
}

/// Where an image upgrade stands (stored in the database, so a restart resumes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeState {
    /// Asked for; the shielded buffer on the new image is not launched yet.
    Pending,
    /// The shielded buffer was launched; waiting for the client to be published.
    Shielded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeView {
    pub image: ImageRef,
    pub state: UpgradeState,
    /// If the new hosts are not ACTIVE by then, the upgrade is rolled back.
    pub deadline: DateTime<Utc>,
}

/// One instance row, as the algorithm sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub id: String,
    pub image_id: String,
    pub instance_type: String,
    pub status: InstanceStatus,
    /// Sessions the host holds when empty (from its instance type).
    pub capacity: u32,
    /// Free sessions now (`remaining_capacity`).
    pub remaining: i32,
    pub created_at: DateTime<Utc>,
    /// The last heartbeat (`heartbeat_at`, on the database clock).
    pub heartbeat_at: DateTime<Utc>,
    /// The row belongs to this controller's fleet. Other rows (from before fleets were
    /// recorded) count as capacity but are never drained or terminated.
    pub owned: bool,
    /// Since when the host has had no session, if it has none now.
    pub idle_since: Option<DateTime<Utc>>,
}

impl HostView {
    /// No user holds a session on it.
    pub fn is_idle(&self) -> bool {
        whist_types::is_idle(self.remaining, self.capacity)
    }
}

/// The fleet-wide settings a decision uses (from `config.settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingSettings {
    pub scale_up_cooldown: chrono::Duration,
    pub scale_down_cooldown: chrono::Duration,
    /// How long a host must have been idle before it may be drained as surplus.
    pub scale_down_delay: chrono::Duration,
    /// A host whose heartbeat is older than this is dead.
    pub heartbeat_timeout: chrono::Duration,
    /// A PRE_CONNECTION host not registered after this long is dead.
    pub instance_ready_timeout: chrono::Duration,
    /// How long before a scheduled rise of the target its hosts are launched.
    pub schedule_lead: chrono::Duration,
}

/// Why hosts are launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchPurpose {
    /// To fill the region's buffer on its current image.
    Buffer,
    /// The shielded buffer of an image upgrade.
    Upgrade,
}

/// What the executor should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Launch {
        image: ImageRef,
        instance_type: String,
        count: u32,
        purpose: LaunchPurpose,
    },
    /// ACTIVE → DRAINING, only if the host is still idle when it happens.
    Drain {
        instance_id: String,
        reason: DrainReason,
    },
    /// Terminate the machine and delete its rows.
    Terminate {
        instance_id: String,
        reason: TerminateReason,
    },
    /// The region's current image becomes the upgrade's.
    SwapImage { image: ImageRef },
    /// The upgrade failed: terminate its hosts, keep the old image.
    RollBackUpgrade { image: ImageRef },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// More free capacity than the target needs.
    Surplus,
    /// Runs an image that is no longer the region's.
    OldImage,
    /// The region is disabled.
    RegionDisabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminateReason {
    /// DRAINING and no session left.
    Drained,
    /// Its heartbeat stopped.
    HeartbeatLost,
    /// Never registered within the ready timeout.
    NeverReady,
}
