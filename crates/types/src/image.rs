//! Machine images (`whist.images`): the active image of each provider and region.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A row of `whist.images`: exactly one active image per (provider, region).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub provider: String,
    pub region: String,
    pub image_id: String,
    /// The commit the image's host-service and the matching client were built from.
    pub client_sha: String,
    pub updated_at: DateTime<Utc>,
}
