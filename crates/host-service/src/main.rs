//! The per-host agent: registers the host, keeps pre-warmed mandelboxes, runs sessions and drains.
//!
//! The service itself is built on the foundation crates (`whist-types`, `whist-dbclient`,
//! `whist-logging`) in its own issue; until then the binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!(
        "host-service {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
