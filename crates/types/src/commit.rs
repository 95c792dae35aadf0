//! The one rule for whether two commit hashes name the same build, used by a host's registration
//! (its row's commit against the host's own) and by assignment (the client's commit against the
//! region's image and its hosts).
//!
//! Rows and images may hold an abbreviated hash while binaries and clients carry the full one,
//! so a hash matches its own abbreviations: one must be a prefix of the other. Empty names no
//! build and matches nothing.

/// Whether `a` and `b` name the same build: both non-empty, and one a prefix of the other.
pub fn same_commit(a: &str, b: &str) -> bool {
    !a.is_empty() && !b.is_empty() && (a.starts_with(b) || b.starts_with(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "0f3c2a9d5e8b7c6a1d2e3f4a5b6c7d8e9f0a1b2c";

    #[test]
    fn a_hash_matches_itself_and_its_abbreviations() {
        for (a, b, same) in [
            (FULL, FULL, true),
            ("0f3c2a9", FULL, true),
            (FULL, "0f3c2a9d5e", true),
            ("local_dev", "local_dev", true),
            ("", FULL, false),
            ("", "", false),
            ("0f3c2a9d", "0f3c2a9e", false),
            ("1f3c2a9", FULL, false),
        ] {
            assert_eq!(same_commit(a, b), same, "{a:?} {b:?}");
            assert_eq!(same_commit(b, a), same, "symmetric: {a:?} {b:?}");
        }
    }
}
