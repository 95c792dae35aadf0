//! The client side of the fleet, for people and benchmarks: [`session`] plays the client app
//! (assign, `json_transport`, end) against any deployment; [`status`] reads the fleet's state.

pub mod session;
pub mod status;
