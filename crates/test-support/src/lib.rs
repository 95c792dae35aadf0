//! The local stack: a throwaway Postgres 15 cluster with the project's migrations applied, and
//! `postrust-server` speaking Hasura's GraphQL dialect in front of it, all on loopback ports
//! picked at start and torn down on exit.
//!
//! Tests call [`shared`] once per test binary. When the environment already describes a running
//! stack (`make test` starts one for the whole run and exports [`StackInfo::env`]), that stack is
//! used; otherwise one is started for this process and cleaned up by a watchdog when the process
//! exits, however it exits.

pub mod bench;
mod client;
pub mod docs;
mod engine;
pub mod faults;
pub mod foreground;
pub mod hostile;
pub mod jwt;
pub mod mandelbox_image;
mod metadata;
pub mod moto;
mod postgres;
mod process;
mod stack;
mod waiting;

pub use engine::{Engine, EngineOptions, engine_binary};
pub use mandelbox_image::reference_mandelbox_image;
pub use metadata::{engine_names_json, notify_triggers_sql, tracked_tables};
pub use moto::{Moto, shared_moto};
pub use postgres::Postgres;
pub use stack::{Stack, StackInfo, StackOptions, repo_root, shared};
pub use waiting::{eventually, unique};
