//! The fleet controller: keeps a buffer of free sessions per region, launches and drains hosts,
//! upgrades machine images without cutting sessions, and assigns users to hosts.

pub mod algorithm;
pub mod assign;
pub mod config;
pub mod fleet;
pub mod hosts;
pub mod http;
pub mod leader;
pub mod metrics;
