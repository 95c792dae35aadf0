//! The fleet controller: keeps a buffer of free mandelboxes per region and assigns users to hosts.
//!
//! The service itself is built on the foundation crates (`whist-types`, `whist-dbclient`,
//! `whist-logging`) in its own issue; until then the binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!(
        "scaling-service {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
