//! Live-query subscriptions that never die silently.
//!
//! [`HasuraClient::subscribe`] starts a background task that owns one websocket
//! (`graphql-transport-ws`) for one live query and keeps it up forever: it reconnects with capped
//! exponential backoff after any failure (refused connection, close frame, GraphQL error,
//! undecodable payload, or silence past the keep-alive deadline) and subscribes again. Each
//! payload is a full result set; the task publishes the latest one, and the [`Subscription`]
//! handle diffs it against what its owner saw last. A slow consumer therefore never blocks the
//! socket and never misses a change: it gets one diff covering everything since its last look.

mod backoff;
mod diff;
pub mod queries;
mod socket;

use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::backoff::Backoff;
use self::diff::Differ;
pub use self::diff::{Keyed, Snapshot};
pub use self::queries::LiveQuery;
use self::socket::{HasuraSocket, LastClose};
use crate::client::ADMIN_SECRET_HEADER;
use crate::error::GraphqlError;
use crate::{DbError, HasuraClient, HasuraConfig};

/// The websocket sub-protocol spoken; always requested explicitly.
const SUBPROTOCOL: &str = "graphql-transport-ws";

/// How a live query connects and decides that a connection is dead.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// First reconnect delay; doubles per failed attempt.
    pub initial_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Deadline for the TCP/TLS/websocket handshake and for the server's `connection_ack`.
    pub connect_timeout: Duration,
    /// After this long without any message the client pings; after `keep_alive_retries` more
    /// silent intervals the connection is declared dead and replaced.
    pub keep_alive_interval: Duration,
    pub keep_alive_retries: usize,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_retries: 1,
        }
    }
}

/// Where a subscription's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Opening a connection (first attempt, or after a failure).
    Connecting { attempt: u32 },
    /// Subscribed; at least one result set arrived on this connection.
    Live,
    /// The last connection failed; waiting before the next attempt.
    Waiting { attempt: u32, error: String },
}

/// The latest result set the task received, tagged with the connection it came over.
#[derive(Debug)]
struct Published<T> {
    rows: Arc<Vec<T>>,
    connection: u64,
}

/// A running live query. Dropping it stops the background task and closes the socket.
#[derive(Debug)]
pub struct Subscription<T: Keyed> {
    name: &'static str,
    latest: watch::Receiver<Option<Arc<Published<T>>>>,
    state: watch::Receiver<ConnectionState>,
    differ: Differ<T>,
    last_connection: u64,
    _stop: DropGuard,
}

impl<T> Subscription<T>
where
    T: Keyed + Clone + PartialEq + Send + Sync + 'static,
{
    /// The next result set and its diff against the previous one this handle returned. Waits
    /// while nothing new arrived; `None` only after the subscription was stopped.
    pub async fn next(&mut self) -> Option<Snapshot<T>> {
        let published = loop {
            if self.latest.changed().await.is_err() {
                return None;
            }
            if let Some(published) = self.latest.borrow_and_update().clone() {
                break published;
            }
        };
        let after_connect = published.connection != self.last_connection;
        self.last_connection = published.connection;
        Some(self.differ.next(published.rows.clone(), after_connect))
    }

    /// The live query's name, for logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The connection's current state.
    pub fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// A receiver that follows the connection state (for readiness probes).
    pub fn state_watch(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }
}

impl HasuraClient {
    /// Starts a live query with the default options.
    pub fn subscribe<T>(&self, query: LiveQuery<T>) -> Subscription<T>
    where
        T: Keyed + Clone + PartialEq + DeserializeOwned + Send + Sync + 'static,
    {
        self.subscribe_with(query, LiveOptions::default())
    }

    /// Starts a live query. Must be called inside a tokio runtime.
    pub fn subscribe_with<T>(&self, query: LiveQuery<T>, options: LiveOptions) -> Subscription<T>
    where
        T: Keyed + Clone + PartialEq + DeserializeOwned + Send + Sync + 'static,
    {
        let (latest_tx, latest) = watch::channel(None);
        let (state_tx, state) = watch::channel(ConnectionState::Connecting { attempt: 1 });
        let stop = CancellationToken::new();
        let senders = Some((latest_tx, state_tx));
        // A client of the fake database is fed by it instead of a websocket.
        #[cfg(any(test, feature = "fake"))]
        let senders = match (&self.fake, senders) {
            (Some(fake), Some((latest_tx, state_tx))) => {
                tokio::spawn(fake_feed(
                    fake.clone(),
                    query.clone(),
                    latest_tx,
                    state_tx,
                    stop.clone(),
                ));
                None
            }
            (_, senders) => senders,
        };
        if let Some((latest, state)) = senders {
            let task = LiveTask {
                config: self.config().clone(),
                query: query.clone(),
                options,
                latest,
                state,
            };
            tokio::spawn(task.run(stop.clone()));
        }
        Subscription {
            name: query.name,
            latest,
            state,
            differ: Differ::new(),
            last_connection: 0,
            _stop: stop.drop_guard(),
        }
    }
}

/// A live query answered by the fake database: a full result set after every write, on one
/// "connection" per stretch of time the fake's live queries are not cut off.
#[cfg(any(test, feature = "fake"))]
async fn fake_feed<T: DeserializeOwned>(
    fake: Arc<crate::fake::FakeDatabase>,
    query: LiveQuery<T>,
    latest: watch::Sender<Option<Arc<Published<T>>>>,
    state: watch::Sender<ConnectionState>,
    stop: CancellationToken,
) {
    let mut versions = fake.versions();
    let mut live = fake.live_watch();
    let mut connection = 0_u64;
    loop {
        if !*live.borrow_and_update() {
            state.send_replace(ConnectionState::Waiting {
                attempt: 1,
                error: "the fake database cut live queries off".to_owned(),
            });
            tokio::select! {
                () = stop.cancelled() => return,
                changed = live.changed() => if changed.is_err() { return },
            }
            continue;
        }
        connection += 1;
        loop {
            // A cut takes effect before anything written after it is published.
            if !*live.borrow_and_update() {
                break;
            }
            versions.borrow_and_update();
            let rows = match fake
                .live_rows(query.name, &query.variables)
                .and_then(|rows| serde_json::from_value::<Vec<T>>(rows).map_err(|e| e.to_string()))
            {
                Ok(rows) => rows,
                Err(error) => {
                    // Never delivers, like a subscription the engine refuses.
                    tracing::error!(live_query = query.name, %error, "the fake database cannot serve it");
                    state.send_replace(ConnectionState::Waiting { attempt: 1, error });
                    stop.cancelled().await;
                    return;
                }
            };
            latest.send_replace(Some(Arc::new(Published {
                rows: Arc::new(rows),
                connection,
            })));
            state.send_if_modified(|state| {
                let changed = *state != ConnectionState::Live;
                *state = ConnectionState::Live;
                changed
            });
            tokio::select! {
                () = stop.cancelled() => return,
                changed = versions.changed() => if changed.is_err() { return },
                changed = live.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// The background task behind one [`Subscription`].
struct LiveTask<T> {
    config: HasuraConfig,
    query: LiveQuery<T>,
    options: LiveOptions,
    latest: watch::Sender<Option<Arc<Published<T>>>>,
    state: watch::Sender<ConnectionState>,
}

impl<T> LiveTask<T>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.options.initial_backoff, self.options.max_backoff);
        let mut connection = 0_u64;
        let mut attempt = 1_u32;
        loop {
            connection += 1;
            self.state
                .send_replace(ConnectionState::Connecting { attempt });
            let ended = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.stream_once(connection) => ended,
            };
            if ended.delivered {
                backoff.reset();
                attempt = 1;
            } else {
                attempt = attempt.saturating_add(1);
            }
            tracing::warn!(
                live_query = self.query.name,
                reason = %ended.reason,
                "live query disconnected; reconnecting"
            );
            self.state.send_replace(ConnectionState::Waiting {
                attempt,
                error: ended.reason,
            });
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One connection, from handshake to its end.
    async fn stream_once(&self, connection: u64) -> Ended {
        let last_close = LastClose::default();
        let mut delivered = false;
        let subscription =
            match tokio::time::timeout(self.options.connect_timeout, self.open(last_close.clone()))
                .await
            {
                Ok(Ok(subscription)) => subscription,
                Ok(Err(reason)) => return Ended { delivered, reason },
                Err(_) => {
                    return Ended {
                        delivered,
                        reason: "timed out connecting".to_owned(),
                    };
                }
            };
        let mut subscription = std::pin::pin!(subscription);
        while let Some(item) = subscription.next().await {
            let payload = match item {
                Ok(payload) => payload,
                Err(error) => {
                    return Ended {
                        delivered,
                        reason: error.to_string(),
                    };
                }
            };
            match decode_payload::<T>(self.query.name, self.query.root, payload) {
                Ok(rows) => {
                    delivered = true;
                    self.latest.send_replace(Some(Arc::new(Published {
                        rows: Arc::new(rows),
                        connection,
                    })));
                    self.state.send_if_modified(|state| {
                        let changed = *state != ConnectionState::Live;
                        *state = ConnectionState::Live;
                        changed
                    });
                }
                Err(error) => {
                    return Ended {
                        delivered,
                        reason: error.to_string(),
                    };
                }
            }
        }
        let reason = match last_close
            .lock()
            .expect("close slot is never poisoned")
            .take()
        {
            Some((code, reason)) => format!("server closed the connection ({code}: {reason})"),
            None => "connection ended".to_owned(),
        };
        Ended { delivered, reason }
    }

    /// Connects, completes the `connection_init`/`connection_ack` handshake and subscribes.
    async fn open(
        &self,
        last_close: LastClose,
    ) -> Result<graphql_ws_client::Subscription<RawOperation>, String> {
        let url = self.config.websocket_url();
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|error| format!("invalid websocket URL {url}: {error}"))?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let (ws, _response) = async_tungstenite::tokio::connect_async(request)
            .await
            .map_err(|error| format!("websocket connect to {url} failed: {error}"))?;
        let headers = match &self.config.admin_secret {
            Some(secret) => serde_json::json!({ ADMIN_SECRET_HEADER: secret }),
            None => serde_json::json!({}),
        };
        graphql_ws_client::Client::build(HasuraSocket::new(ws, last_close))
            .payload(serde_json::json!({ "headers": headers }))
            .map_err(|error| error.to_string())?
            .keep_alive_interval(self.options.keep_alive_interval)
            .keep_alive_retries(self.options.keep_alive_retries)
            .subscribe(RawOperation(self.query.request_body()))
            .await
            .map_err(|error| format!("subscribe failed: {error}"))
    }
}

/// Why a connection ended, and whether it delivered anything first.
struct Ended {
    delivered: bool,
    reason: String,
}

/// A subscribe payload whose responses are passed through undecoded.
struct RawOperation(Value);

impl serde::Serialize for RawOperation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl graphql_ws_client::graphql::GraphqlOperation for RawOperation {
    type Response = Value;
    type Error = serde_json::Error;

    fn decode(&self, data: Value) -> Result<Value, serde_json::Error> {
        Ok(data)
    }
}

/// Reads the rows out of one `next` payload (`{data, errors}`).
fn decode_payload<T: DeserializeOwned>(
    operation: &'static str,
    root: &'static str,
    mut payload: Value,
) -> Result<Vec<T>, DbError> {
    if let Some(errors) = payload.get("errors").filter(|errors| !errors.is_null()) {
        let errors: Vec<GraphqlError> =
            serde_json::from_value(errors.clone()).map_err(|error| DbError::Decode {
                operation,
                message: format!("unreadable errors: {error}"),
            })?;
        if !errors.is_empty() {
            return Err(DbError::from_graphql_errors(operation, &errors));
        }
    }
    let rows = payload
        .get_mut("data")
        .and_then(|data| data.get_mut(root))
        .map(Value::take)
        .ok_or_else(|| DbError::Decode {
            operation,
            message: format!("payload has no data.{root}"),
        })?;
    serde_json::from_value(rows).map_err(|error| DbError::Decode {
        operation,
        message: format!("{root}: {error}"),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn payload_errors_and_bad_shapes_are_typed_errors() {
        let errors =
            json!({"errors": [{"message": "denied", "extensions": {"code": "access-denied"}}]});
        assert!(matches!(
            decode_payload::<i32>("Q", "rows", errors),
            Err(DbError::AccessDenied { .. })
        ));
        assert!(matches!(
            decode_payload::<i32>("Q", "rows", json!({"data": {"other": []}})),
            Err(DbError::Decode { .. })
        ));
        assert!(matches!(
            decode_payload::<i32>("Q", "rows", json!({"data": {"rows": ["x"]}})),
            Err(DbError::Decode { .. })
        ));
        assert_eq!(
            decode_payload::<i32>("Q", "rows", json!({"data": {"rows": [1, 2]}})).expect("rows"),
            vec![1, 2]
        );
    }
}
