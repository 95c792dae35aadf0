//! Buffers by hour of the week: the rows of `config.region_schedules`.

use serde::{Deserialize, Serialize};

/// How many free mandelboxes a region keeps during one hour of the week, in the region's
/// `schedule_time_zone`. An hour without a row keeps the region's `desired_free_mandelboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledBuffer {
    pub region: String,
    /// ISO weekday: 1 = Monday … 7 = Sunday.
    pub weekday: i16,
    /// 0–23, in the region's schedule time zone.
    pub hour: i16,
    pub desired_free_mandelboxes: i32,
}
