//! The per-host agent: registers the host, keeps pre-warmed mandelboxes, runs sessions and drains.

pub mod http;
pub mod resources;
