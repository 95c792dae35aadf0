//! A client's `json_transport` on its way through the agent, and every answer it can get.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use whist_types::MandelboxId;

use crate::resources::HostPorts;

/// What the client gets when its session is ready: where to connect and the session key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionReady {
    #[serde(flatten)]
    pub ports: HostPorts,
    pub aes_key: String,
}

/// Why a `json_transport` was not answered with a session. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("no mandelbox with this id runs on this host")]
    UnknownMandelbox,
    #[error("this mandelbox is not assigned to you")]
    NotYours,
    #[error("this mandelbox already received its configuration")]
    Repeated,
    #[error("the mandelbox did not become ready within {} s", .0.as_secs())]
    NotReady(Duration),
    #[error("the mandelbox ended before it was ready")]
    Gone,
    #[error("this host is draining and takes no new sessions")]
    Draining,
    #[error("the database is unavailable; try again")]
    Unavailable,
    #[error("json_data is neither a JSON object nor base64 of a gzipped one")]
    BadConfig,
    #[error("{0}")]
    Internal(String),
}

pub type TransportReply = Result<SessionReady, TransportError>;

/// A `json_transport` the HTTP layer has authenticated and parsed. Its configuration stays as
/// the client sent it until the agent knows the caller owns the box: inflating it is the costly
/// part, and a stranger's request must never get that far.
#[derive(Debug)]
pub struct TransportRequest {
    pub id: MandelboxId,
    /// The token's subject; `None` when this host runs without authentication (local mode).
    pub caller: Option<String>,
    /// The client's `json_data`, not yet decoded (a JSON object, or base64 of a gzipped one).
    pub json_data: String,
    pub received: Instant,
    reply: oneshot::Sender<TransportReply>,
}

impl TransportRequest {
    pub fn new(
        id: MandelboxId,
        caller: Option<String>,
        json_data: String,
    ) -> (Self, oneshot::Receiver<TransportReply>) {
        let (reply, receiver) = oneshot::channel();
        let request = Self {
            id,
            caller,
            json_data,
            received: Instant::now(),
            reply,
        };
        (request, receiver)
    }

    /// Whether the caller may use a box assigned to `user`.
    pub fn may_use(&self, user: &str) -> bool {
        self.caller.as_deref().is_none_or(|caller| caller == user)
    }

    /// Answers the caller. A caller that went away meanwhile is not an error.
    pub fn answer(self, reply: TransportReply) {
        let _ = self.reply.send(reply);
    }
}
