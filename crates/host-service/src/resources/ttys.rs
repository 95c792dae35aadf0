//! Virtual terminal numbers for the X servers inside mandelboxes.
//!
//! Each box's X server runs on its own host TTY (`/dev/ttyN`). The low numbers
//! belong to the host (getty on 1-6, a local display around 7), and the kernel
//! has at most 63 virtual consoles, so boxes get 10..=63.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use super::ResourceError;

/// Hands out TTY numbers, lowest free first.
#[derive(Debug)]
pub struct TtyAllocator {
    range: RangeInclusive<u8>,
    in_use: BTreeSet<u8>,
}

impl TtyAllocator {
    /// The TTYs mandelboxes get by default.
    pub const DEFAULT_RANGE: RangeInclusive<u8> = 10..=63;

    /// An allocator over `range`.
    pub fn new(range: RangeInclusive<u8>) -> Self {
        TtyAllocator {
            range,
            in_use: BTreeSet::new(),
        }
    }

    /// Allocates the lowest free TTY.
    pub fn allocate(&mut self) -> Result<u8, ResourceError> {
        let tty = self
            .range
            .clone()
            .find(|tty| !self.in_use.contains(tty))
            .ok_or(ResourceError::TtysExhausted)?;
        self.in_use.insert(tty);
        Ok(tty)
    }

    /// Marks a TTY as used, for adopting a container that already holds it.
    pub fn claim(&mut self, tty: u8) -> Result<(), ResourceError> {
        if !self.range.contains(&tty) {
            return Err(ResourceError::TtyOutOfRange(tty));
        }
        if !self.in_use.insert(tty) {
            return Err(ResourceError::TtyInUse(tty));
        }
        Ok(())
    }

    /// Gives a TTY back. Releasing one that is not in use is logged, not fatal.
    pub fn release(&mut self, tty: u8) {
        if !self.in_use.remove(&tty) {
            tracing::warn!(tty, "released a TTY that was not in use");
        }
    }

    /// How many TTYs are in use.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }
}

impl Default for TtyAllocator {
    fn default() -> Self {
        TtyAllocator::new(Self::DEFAULT_RANGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_first() {
        let mut ttys = TtyAllocator::default();
        assert_eq!(ttys.allocate().expect("free"), 10);
        assert_eq!(ttys.allocate().expect("free"), 11);
        assert_eq!(ttys.allocate().expect("free"), 12);
        ttys.release(11);
        assert_eq!(ttys.allocate().expect("free"), 11);
        assert_eq!(ttys.allocate().expect("free"), 13);
        assert_eq!(ttys.in_use(), 4);
    }

    #[test]
    fn default_range_has_54_ttys() {
        let mut ttys = TtyAllocator::default();
        let all: Vec<u8> = (0..54).map(|_| ttys.allocate().expect("free")).collect();
        assert_eq!(all, (10..=63).collect::<Vec<_>>());
        assert!(matches!(ttys.allocate(), Err(ResourceError::TtysExhausted)));
    }

    #[test]
    fn exhaustion_and_release() {
        let mut ttys = TtyAllocator::new(20..=21);
        let a = ttys.allocate().expect("free");
        ttys.allocate().expect("free");
        assert!(matches!(ttys.allocate(), Err(ResourceError::TtysExhausted)));
        assert_eq!(ttys.in_use(), 2);
        ttys.release(a);
        assert_eq!(ttys.allocate().expect("released one is free"), a);
        // Releasing something not in use only warns.
        ttys.release(40);
        assert_eq!(ttys.in_use(), 2);
    }

    #[test]
    fn claim_conflicts() {
        let mut ttys = TtyAllocator::default();
        ttys.claim(10).expect("free");
        assert!(matches!(ttys.claim(10), Err(ResourceError::TtyInUse(10))));
        assert!(matches!(
            ttys.claim(5),
            Err(ResourceError::TtyOutOfRange(5))
        ));
        assert_eq!(ttys.allocate().expect("free"), 11);
    }
}
