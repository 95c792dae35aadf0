//! Host resources handed to mandelboxes: ports, TTYs, GPU slots and uinput devices.
//!
//! The allocators are plain `&mut self` structs: the agent keeps its state in one
//! actor, so they need no locking of their own. Each one can also `claim` what a
//! container already holds, so that boxes found running after a restart are
//! adopted instead of being handed the same resources twice.

use std::io;

pub mod gpus;
pub mod ports;
pub mod ttys;
pub mod uinput;

pub use gpus::{
    FakeGpus, GpuInfo, GpuInventory, GpuSlots, GpuUsage, MANDELBOXES_PER_GPU, NoGpus, NvmlGpus,
    discover_gpus,
};
pub use ports::{HostPorts, PortAllocator, PortBinding, Protocol};
pub use ttys::TtyAllocator;
pub use uinput::{DEFAULT_UINPUT_PATH, UinputDevices, serve_device_fds, uinput_available};

/// Why a resource could not be allocated, claimed or set up.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// One full scan of the port range found no four usable ports.
    #[error("no four free host ports left in {start}..{end}")]
    PortsExhausted {
        /// First port of the allocatable range.
        start: u16,
        /// End (exclusive) of the allocatable range.
        end: u16,
    },
    /// A port to claim is already in use (or reserved) for that protocol.
    #[error("host port {port}/{protocol} is already in use or reserved")]
    PortInUse {
        /// The conflicting host port.
        port: u16,
        /// The protocol it conflicts on.
        protocol: Protocol,
    },
    /// Every TTY in the range is in use.
    #[error("no free TTY left")]
    TtysExhausted,
    /// The TTY to claim is already in use.
    #[error("TTY {0} is already in use")]
    TtyInUse(u8),
    /// The TTY to claim is outside the allocatable range.
    #[error("TTY {0} is outside the allocatable range")]
    TtyOutOfRange(u8),
    /// The host has GPUs but all of them hold as many mandelboxes as allowed.
    #[error("every GPU already runs the maximum number of mandelboxes")]
    NoFreeGpu,
    /// The GPU index is not one of this host's GPUs.
    #[error("GPU {0} is not one of this host's GPUs")]
    GpuSlotUnknown(u32),
    /// The GPU to claim already runs the maximum number of mandelboxes.
    #[error("GPU {0} already runs the maximum number of mandelboxes")]
    GpuFull(u32),
    /// A step of creating or destroying uinput devices failed.
    #[error("uinput: {operation} failed")]
    Uinput {
        /// What was being done, e.g. "open /dev/uinput" or "UI_DEV_CREATE".
        operation: &'static str,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// Serving the uinput file descriptors over the Unix socket failed.
    #[error("passing device fds: {operation} failed")]
    FdPassing {
        /// What was being done, e.g. "bind" or "sendmsg".
        operation: &'static str,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
}
