//! Sessions (`whist.mandelboxes`): one row per container, pre-warmed or in use.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::string_enum;

/// A mandelbox id. Always a UUID (the schema checks it), shown in its hyphenated lower-case form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MandelboxId(pub uuid::Uuid);

impl MandelboxId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl std::fmt::Display for MandelboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl std::str::FromStr for MandelboxId {
    type Err = uuid::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse().map(Self)
    }
}

/// Where a mandelbox is in its life. The row is deleted once the container is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MandelboxStatus {
    /// Pre-warmed ("zygote"), belongs to nobody, free to claim.
    Waiting,
    /// Claimed for a user by the scaling-service; the host has not seen the client yet.
    Allocated,
    /// The host received the assignment and waits for the client's config.
    Connecting,
    /// The session is running.
    Running,
    /// The container is shutting down.
    Dying,
}

string_enum!(MandelboxStatus, "mandelbox", {
    Waiting => "WAITING",
    Allocated => "ALLOCATED",
    Connecting => "CONNECTING",
    Running => "RUNNING",
    Dying => "DYING",
});

impl MandelboxStatus {
    /// Counts against the user's limit: assigned and not yet shutting down.
    pub const fn is_live_session(self) -> bool {
        matches!(self, Self::Allocated | Self::Connecting | Self::Running)
    }
}

/// A row of `whist.mandelboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mandelbox {
    pub id: MandelboxId,
    /// Upper-case application name, e.g. `WHISTIUM`.
    pub app: String,
    pub instance_id: String,
    /// The assigned user (the JWT subject); `None` while WAITING.
    pub user_id: Option<String>,
    /// The client's session id as decimal text.
    pub session_id: Option<String>,
    pub status: MandelboxStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a host writes when it starts a zygote (always WAITING, owned by nobody).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewMandelbox {
    pub id: MandelboxId,
    pub app: String,
    pub instance_id: String,
    pub status: MandelboxStatus,
}

impl NewMandelbox {
    pub fn waiting(
        id: MandelboxId,
        app: impl Into<String>,
        instance_id: impl Into<String>,
    ) -> Self {
        Self {
            id,
            app: app.into(),
            instance_id: instance_id.into(),
            status: MandelboxStatus::Waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_displays_as_hyphenated_lower_case() {
        let id: MandelboxId = "6F9619FF-8B86-D011-B42D-00CF4FC964FF"
            .parse()
            .expect("uuid");
        assert_eq!(id.to_string(), "6f9619ff-8b86-d011-b42d-00cf4fc964ff");
    }

    #[test]
    fn a_non_uuid_id_is_a_decode_error_not_a_panic() {
        let decoded = serde_json::from_value::<MandelboxId>(serde_json::json!("not-a-uuid"));
        assert!(decoded.is_err());
    }

    #[test]
    fn only_assigned_running_states_are_live() {
        let live: Vec<_> = MandelboxStatus::ALL
            .iter()
            .filter(|status| status.is_live_session())
            .collect();
        assert_eq!(
            live,
            [
                &MandelboxStatus::Allocated,
                &MandelboxStatus::Connecting,
                &MandelboxStatus::Running
            ]
        );
    }
}
