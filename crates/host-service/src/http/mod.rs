//! The host's HTTP surface: `json_transport` over TLS, health and metrics.

pub mod auth;
pub mod tls;
