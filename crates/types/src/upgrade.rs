//! Image upgrades (`config.image_upgrades`) and leases (`config.leases`): the scaling-service's
//! state that must survive its restarts.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::string_enum;

/// Where an image upgrade of one region stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UpgradeStatus {
    /// Asked for; the new image's buffer is not launched yet.
    Pending,
    /// The new image's buffer is launched and shielded from scale-down.
    Shielded,
    /// The region runs the new image.
    Swapped,
    /// The new hosts never became ACTIVE; the region kept its old image.
    RolledBack,
}

string_enum!(UpgradeStatus, "upgrade", {
    Pending => "PENDING",
    Shielded => "SHIELDED",
    Swapped => "SWAPPED",
    RolledBack => "ROLLED_BACK",
});

impl UpgradeStatus {
    /// Still to be carried through (the region's shield is up).
    pub const fn in_progress(self) -> bool {
        matches!(self, Self::Pending | Self::Shielded)
    }
}

/// A row of `config.image_upgrades`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUpgrade {
    pub provider: String,
    pub region: String,
    pub image_id: String,
    pub client_sha: String,
    #[serde(rename = "state")]
    pub status: UpgradeStatus,
    pub deadline_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A row of `config.leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub holder: Option<String>,
    /// Bumped by the database whenever the lease changes hands: the fencing value of a term.
    pub generation: i64,
    pub expires_at: DateTime<Utc>,
    /// The database's clock when the lease was last written.
    pub renewed_at: DateTime<Utc>,
}
