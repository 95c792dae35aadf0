//! The fleet controller: keeps a buffer of free sessions per region, launches and drains hosts,
//! upgrades machine images without cutting sessions, and assigns users to hosts.

pub mod algorithm;
pub mod hosts;
