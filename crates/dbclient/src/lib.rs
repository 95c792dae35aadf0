//! The Hasura client: the one way both services reach the database.
//!
//! - [`ops`] builds every query and mutation as an [`Operation`] value;
//! - [`HasuraClient::execute`] sends one over HTTP and decodes the answer or a typed [`DbError`];
//! - [`HasuraClient::claim_mandelbox`] is the atomic claim, with refusals as [`ClaimOutcome`]s;
//! - [`HasuraClient::subscribe`] runs a [`live`] query that reconnects forever and delivers every
//!   result set as a full [`Snapshot`] with a diff by row id.

mod claim;
mod client;
mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod live;
mod operation;
pub mod ops;

pub use claim::ClaimOutcome;
pub use client::{HasuraClient, HasuraConfig};
pub use error::DbError;
pub use live::{ConnectionState, Keyed, LiveOptions, LiveQuery, Snapshot, Subscription};
pub use operation::{Fence, Operation};
