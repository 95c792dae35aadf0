//! Snapshots and the difference between two of them, by row id.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use whist_types::{
    DesktopAppVersion, FleetSettings, Image, Instance, Mandelbox, MandelboxId, RegionConfig,
};

/// A row with an identity that survives changes to its other columns.
pub trait Keyed {
    type Key: Eq + Hash + Clone + std::fmt::Debug + Send + Sync + 'static;

    fn key(&self) -> Self::Key;
}

impl Keyed for Instance {
    type Key = String;

    fn key(&self) -> String {
        self.id.clone()
    }
}

impl Keyed for Mandelbox {
    type Key = MandelboxId;

    fn key(&self) -> MandelboxId {
        self.id
    }
}

impl Keyed for Image {
    type Key = (String, String);

    fn key(&self) -> (String, String) {
        (self.provider.clone(), self.region.clone())
    }
}

impl Keyed for whist_types::ImageUpgrade {
    type Key = (String, String, String);

    fn key(&self) -> (String, String, String) {
        (
            self.provider.clone(),
            self.region.clone(),
            self.image_id.clone(),
        )
    }
}

impl Keyed for whist_types::ScheduledBuffer {
    type Key = (String, i16, i16);

    fn key(&self) -> (String, i16, i16) {
        (self.region.clone(), self.weekday, self.hour)
    }
}

impl Keyed for RegionConfig {
    type Key = String;

    fn key(&self) -> String {
        self.region.clone()
    }
}

impl Keyed for FleetSettings {
    /// There is one settings row.
    type Key = ();

    fn key(&self) {}
}

impl Keyed for DesktopAppVersion {
    type Key = i32;

    fn key(&self) -> i32 {
        self.id
    }
}

/// One delivery of a live query: the full result, and how it differs from the previous delivery
/// to the same subscriber.
#[derive(Debug, Clone)]
pub struct Snapshot<T> {
    /// Every row the query matches now, in the engine's order.
    pub rows: Arc<Vec<T>>,
    /// Rows that were not in the previous delivery.
    pub added: Vec<T>,
    /// Rows whose columns differ from the previous delivery (new values).
    pub changed: Vec<T>,
    /// Rows of the previous delivery that are gone (old values).
    pub removed: Vec<T>,
    /// The first delivery over a new connection (the first ever, or after a reconnect). Its diff
    /// covers everything that changed while disconnected.
    pub after_connect: bool,
}

impl<T> Snapshot<T> {
    /// Whether anything differs from the previous delivery.
    pub fn has_changes(&self) -> bool {
        !(self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty())
    }
}

/// Remembers what a subscriber last saw and computes the next diff against it.
#[derive(Debug)]
pub(crate) struct Differ<T: Keyed> {
    seen: HashMap<T::Key, T>,
}

impl<T: Keyed + Clone + PartialEq> Differ<T> {
    pub(crate) fn new() -> Self {
        Self {
            seen: HashMap::new(),
        }
    }

    pub(crate) fn next(&mut self, rows: Arc<Vec<T>>, after_connect: bool) -> Snapshot<T> {
        let mut previous = std::mem::take(&mut self.seen);
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for row in rows.iter() {
            let key = row.key();
            match previous.remove(&key) {
                None => added.push(row.clone()),
                Some(old) if old != *row => changed.push(row.clone()),
                Some(_) => {}
            }
            self.seen.insert(key, row.clone());
        }
        let removed = previous.into_values().collect();
        Snapshot {
            rows,
            added,
            changed,
            removed,
            after_connect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Row {
        id: u32,
        value: &'static str,
    }

    impl Keyed for Row {
        type Key = u32;

        fn key(&self) -> u32 {
            self.id
        }
    }

    fn rows(rows: &[(u32, &'static str)]) -> Arc<Vec<Row>> {
        Arc::new(rows.iter().map(|&(id, value)| Row { id, value }).collect())
    }

    #[test]
    fn the_first_snapshot_adds_everything() {
        let mut differ = Differ::new();
        let snapshot = differ.next(rows(&[(1, "a"), (2, "b")]), true);
        assert_eq!(snapshot.added.len(), 2);
        assert!(snapshot.changed.is_empty() && snapshot.removed.is_empty());
    }

    #[test]
    fn every_row_is_compared_not_just_the_first() {
        let mut differ = Differ::new();
        differ.next(rows(&[(1, "a"), (2, "b"), (3, "c")]), true);
        let snapshot = differ.next(rows(&[(1, "a"), (3, "C"), (4, "d")]), false);
        assert_eq!(snapshot.added, vec![Row { id: 4, value: "d" }]);
        assert_eq!(snapshot.changed, vec![Row { id: 3, value: "C" }]);
        assert_eq!(snapshot.removed, vec![Row { id: 2, value: "b" }]);
        assert_eq!(snapshot.rows.len(), 3);
    }

    #[test]
    fn an_identical_snapshot_has_no_changes() {
        let mut differ = Differ::new();
        differ.next(rows(&[(1, "a")]), true);
        assert!(!differ.next(rows(&[(1, "a")]), false).has_changes());
    }

    #[test]
    fn an_empty_snapshot_removes_everything() {
        let mut differ = Differ::new();
        differ.next(rows(&[(1, "a"), (2, "b")]), true);
        let snapshot = differ.next(rows(&[]), false);
        assert_eq!(snapshot.removed.len(), 2);
    }
}
