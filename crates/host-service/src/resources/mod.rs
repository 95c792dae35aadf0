//! Host resources handed to mandelboxes: ports, TTYs, GPU slots and uinput devices.

pub mod gpus;
pub mod ports;
pub mod ttys;
pub mod uinput;
