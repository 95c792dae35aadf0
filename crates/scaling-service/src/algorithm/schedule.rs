//! The buffer a region keeps at a given moment: what its schedule says for that hour of the week
//! in the schedule's time zone, or the region's default for an hour the schedule leaves out.
//!
//! The hours are local, so a schedule follows the people it serves through daylight-saving
//! changes: "Monday 08:00 in Europe/Berlin" is 07:00 UTC in winter and 06:00 UTC in summer. On
//! the day the clocks go forward the skipped hour never comes; on the day they go back the
//! repeated hour keeps its target for both passes through it.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use whist_types::ScheduledBuffer;

/// A region's buffer targets by hour of the week.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BufferSchedule {
    /// The zone the hours are in; `None` when the configured name is not a zone this build
    /// knows, and then only the default applies (see [`BufferSchedule::zone_known`]).
    zone: Option<Tz>,
    /// (ISO weekday 1–7 from Monday, hour 0–23) → free mandelboxes to keep.
    hours: BTreeMap<(u8, u8), u32>,
}

impl BufferSchedule {
    /// A schedule in the IANA zone `zone` (e.g. `Europe/Berlin`, `UTC`) with targets for the
    /// given (weekday, hour) cells; cells out of range are ignored (the database refuses them).
    pub fn new(zone: &str, cells: impl IntoIterator<Item = (u8, u8, u32)>) -> Self {
        Self {
            zone: zone.parse().ok(),
            hours: cells
                .into_iter()
                .filter(|&(weekday, hour, _)| (1..=7).contains(&weekday) && hour < 24)
                .map(|(weekday, hour, target)| ((weekday, hour), target))
                .collect(),
        }
    }

    /// The schedule of a region from its rows of `config.region_schedules` (rows out of range,
    /// which the database refuses, are ignored; a negative target counts as zero).
    pub fn from_rows<'a>(zone: &str, rows: impl IntoIterator<Item = &'a ScheduledBuffer>) -> Self {
        let cells = rows.into_iter().filter_map(|row| {
            Some((
                u8::try_from(row.weekday).ok()?,
                u8::try_from(row.hour).ok()?,
                u32::try_from(row.desired_free_mandelboxes).unwrap_or(0),
            ))
        });
        Self::new(zone, cells)
    }

    /// Whether the schedule's zone is known. A schedule in an unknown zone is not applied.
    pub fn zone_known(&self) -> bool {
        self.zone.is_some()
    }

    /// Whether any hour has a target of its own.
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    /// The target at `now`, raised early to a rise that comes within `lead`: hosts for a higher
    /// target are launched `lead` before its hour, while a lower one waits for its hour.
    pub fn target_ahead(&self, default: u32, now: DateTime<Utc>, lead: chrono::Duration) -> u32 {
        let current = self.target_at(default, now);
        if lead <= chrono::Duration::zero() {
            return current;
        }
        current.max(self.target_at(default, now + lead))
    }

    /// The target at `now`: the schedule's for that local hour, else `default`.
    pub fn target_at(&self, default: u32, now: DateTime<Utc>) -> u32 {
        let Some(zone) = self.zone else {
            return default;
        };
        let local = now.with_timezone(&zone);
        let cell = (
            local.weekday().number_from_monday() as u8,
            local.hour() as u8,
        );
        self.hours.get(&cell).copied().unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("an RFC 3339 time")
    }

    /// Monday 08:00–09:59 and Sunday 23:00 have targets of their own.
    fn schedule(zone: &str) -> BufferSchedule {
        BufferSchedule::new(zone, [(1, 8, 10), (1, 9, 6), (7, 23, 1)])
    }

    #[test]
    fn targets_follow_the_hours_of_the_week_and_the_default_fills_the_rest() {
        // 2026-11-30 is a Monday.
        let cases = [
            (
                "2026-11-30T07:59:59Z",
                2,
                "the last second before the scheduled hour",
            ),
            ("2026-11-30T08:00:00Z", 10, "the first second of it"),
            ("2026-11-30T08:59:59Z", 10, "its last second"),
            ("2026-11-30T09:00:00Z", 6, "the next hour's own target"),
            ("2026-11-30T10:00:00Z", 2, "back to the default"),
            ("2026-12-06T23:30:00Z", 1, "Sunday night"),
            ("2026-12-07T00:00:00Z", 2, "the week wraps to Monday"),
            ("2026-12-07T08:15:00Z", 10, "and repeats"),
        ];
        for (now, expected, why) in cases {
            assert_eq!(
                schedule("UTC").target_at(2, at(now)),
                expected,
                "{now}: {why}"
            );
        }
    }

    #[test]
    fn hours_are_local_to_the_zone_through_daylight_saving() {
        let berlin = schedule("Europe/Berlin");
        let cases = [
            // Winter (CET, UTC+1): Monday 08:00 local is 07:00 UTC.
            ("2026-11-30T06:59:00Z", 2),
            ("2026-11-30T07:00:00Z", 10),
            ("2026-11-30T08:00:00Z", 6),
            // Summer (CEST, UTC+2): Monday 08:00 local is 06:00 UTC.
            ("2026-06-01T06:00:00Z", 10),
            ("2026-06-01T07:00:00Z", 6),
            ("2026-06-01T08:00:00Z", 2),
            // Sunday 23:00 in Berlin is already Sunday 22:00 UTC; Monday 00:30 Berlin is still
            // Sunday in UTC.
            ("2026-12-06T22:30:00Z", 1),
            ("2026-12-06T23:30:00Z", 2),
        ];
        for (now, expected) in cases {
            assert_eq!(berlin.target_at(2, at(now)), expected, "{now}");
        }
        // West of UTC the local day starts later: Monday 08:00 in New York (EST) is 13:00 UTC.
        let new_york = schedule("America/New_York");
        assert_eq!(new_york.target_at(2, at("2026-11-30T12:59:00Z")), 2);
        assert_eq!(new_york.target_at(2, at("2026-11-30T13:00:00Z")), 10);
    }

    #[test]
    fn the_days_the_clocks_change_keep_every_existing_hour() {
        // Berlin's clocks go forward on 2026-03-29 at 02:00 (01:00 UTC): local 02:xx never
        // happens; back on 2026-10-25 at 03:00 (01:00 UTC): local 02:xx happens twice.
        let sunday = BufferSchedule::new("Europe/Berlin", [(7, 2, 9), (7, 3, 4)]);
        assert_eq!(
            sunday.target_at(0, at("2026-03-29T00:59:00Z")),
            0,
            "01:59 CET"
        );
        assert_eq!(
            sunday.target_at(0, at("2026-03-29T01:00:00Z")),
            4,
            "03:00 CEST"
        );
        assert_eq!(
            sunday.target_at(0, at("2026-10-25T00:30:00Z")),
            9,
            "02:30 CEST"
        );
        assert_eq!(
            sunday.target_at(0, at("2026-10-25T01:30:00Z")),
            9,
            "02:30 CET, again"
        );
        assert_eq!(
            sunday.target_at(0, at("2026-10-25T02:00:00Z")),
            4,
            "03:00 CET"
        );
    }

    #[test]
    fn a_rise_starts_its_lead_early_and_a_fall_waits_for_its_hour() {
        let lead = chrono::Duration::minutes(5);
        let utc = schedule("UTC");
        let cases = [
            ("2026-11-30T07:54:59Z", 2, "before the lead"),
            ("2026-11-30T07:55:00Z", 10, "the rise's lead begins"),
            ("2026-11-30T08:30:00Z", 10, "within the hour"),
            (
                "2026-11-30T08:55:00Z",
                10,
                "the next hour is lower: no early fall",
            ),
            ("2026-11-30T09:00:00Z", 6, "the fall at its hour"),
            ("2026-11-30T09:55:00Z", 6, "a fall to the default waits too"),
            ("2026-11-30T10:00:00Z", 2, "the default"),
        ];
        for (now, expected, why) in cases {
            assert_eq!(utc.target_ahead(2, at(now), lead), expected, "{now}: {why}");
        }
        assert_eq!(
            utc.target_ahead(2, at("2026-11-30T07:55:00Z"), chrono::Duration::zero()),
            2,
            "no lead: the hour itself"
        );
    }

    #[test]
    fn an_unknown_zone_or_no_cells_keep_the_default() {
        let unknown = schedule("Mars/Olympus_Mons");
        assert!(!unknown.zone_known());
        assert_eq!(unknown.target_at(2, at("2026-11-30T08:00:00Z")), 2);
        let empty = BufferSchedule::new("UTC", []);
        assert!(empty.is_empty());
        assert_eq!(empty.target_at(5, at("2026-11-30T08:00:00Z")), 5);
        assert_eq!(
            BufferSchedule::default().target_at(3, at("2026-11-30T08:00:00Z")),
            3
        );
        let out_of_range = BufferSchedule::new("UTC", [(0, 8, 9), (8, 8, 9), (1, 24, 9)]);
        assert!(out_of_range.is_empty());
    }

    #[test]
    fn rows_become_cells_and_rows_out_of_range_are_dropped() {
        let row = |weekday, hour, target| ScheduledBuffer {
            region: "r".to_owned(),
            weekday,
            hour,
            desired_free_mandelboxes: target,
        };
        let rows = [row(1, 8, 10), row(1, -1, 9), row(-3, 8, 9), row(1, 9, -4)];
        let schedule = BufferSchedule::from_rows("UTC", &rows);
        assert_eq!(
            schedule,
            BufferSchedule::new("UTC", [(1, 8, 10), (1, 9, 0)])
        );
    }
}
