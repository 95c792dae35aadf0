//! Domain types shared by the host-service and the scaling-service.
//!
//! Everything here is plain data with serde mappings that match the database columns exactly as
//! the GraphQL engine returns them. There is no I/O and no async runtime in this crate, so both
//! services and the tests can use it freely.

pub mod capacity;
pub mod commit;
pub mod config;
pub mod image;
pub mod instance;
pub mod mandelbox;
pub mod schedule;
mod status;
pub mod upgrade;

pub use capacity::{InstanceTypeSpec, capacity_of, instance_type_spec, is_idle};
pub use commit::same_commit;
pub use config::{DesktopAppVersion, Environment, FleetSettings, RegionConfig};
pub use image::Image;
pub use instance::{
    Instance, InstanceStatus, InstanceWithMandelboxes, MandelboxWithInstance, NewInstance,
    PROVIDER_AWS, host_address,
};
pub use mandelbox::{Mandelbox, MandelboxId, MandelboxStatus, NewMandelbox};
pub use schedule::ScheduledBuffer;
pub use status::UnknownStatus;
pub use upgrade::{ImageUpgrade, Lease, UpgradeStatus};
