//! The websocket under a live query, adapted to graphql-ws-client.
//!
//! graphql-ws-client answers every protocol `ping` with a `pong` that has no payload, and Hasura
//! answers any `pong` but the echo of its keep-alive (`{"message":"keepalive"}`) with another
//! `ping`: together they can bounce messages forever. This adapter answers server pings itself
//! with the ping's own payload (a ping without one gets a pong without one, as the protocol's
//! pong mirrors its ping), and hands the client only a websocket-level `Pong`, which the client
//! ignores except to note that the connection is alive (its keep-alive timer restarts on every
//! message).

use std::sync::{Arc, Mutex};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message as WsMessage;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use futures::io::{AsyncRead, AsyncWrite};
use futures::{SinkExt, StreamExt};
use graphql_ws_client::{Connection, Error as ClientError, Message};
use serde_json::Value;

/// The close frame the server sent last, kept for the reconnect log line.
pub(crate) type LastClose = Arc<Mutex<Option<(u16, String)>>>;

pub(crate) struct HasuraSocket<S> {
    ws: WebSocketStream<S>,
    last_close: LastClose,
}

impl<S> HasuraSocket<S> {
    pub(crate) fn new(ws: WebSocketStream<S>, last_close: LastClose) -> Self {
        Self { ws, last_close }
    }
}

/// A protocol-level `ping` from the server, if `text` is one: `Some(payload)`, where `payload` is
/// `None` for a ping without one (an absent or `null` payload, as Hasura's `.:? "payload"` reads
/// it).
fn server_ping(text: &str) -> Option<Option<Value>> {
    // Cheap pre-check: almost every message is data, not a ping.
    if !text.contains("\"ping\"") {
        return None;
    }
    let message: Value = serde_json::from_str(text).ok()?;
    (message.get("type")?.as_str()? == "ping").then(|| {
        message
            .get("payload")
            .cloned()
            .filter(|payload| !payload.is_null())
    })
}

/// The `pong` that answers a ping with `payload`: the same payload, or none when it had none.
fn pong(payload: Option<Value>) -> String {
    match payload {
        Some(payload) => serde_json::json!({ "type": "pong", "payload": payload }),
        None => serde_json::json!({ "type": "pong" }),
    }
    .to_string()
}

impl<S> Connection for HasuraSocket<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn receive(&mut self) -> Option<Message> {
        loop {
            match self.ws.next().await? {
                Ok(WsMessage::Text(text)) => {
                    if let Some(payload) = server_ping(text.as_str()) {
                        if self
                            .ws
                            .send(WsMessage::Text(pong(payload).into()))
                            .await
                            .is_err()
                        {
                            return None;
                        }
                        return Some(Message::Pong);
                    }
                    return Some(Message::Text(text.as_str().to_owned()));
                }
                Ok(WsMessage::Ping(_)) => {
                    // tungstenite queued the websocket-level pong; push it out now.
                    if SinkExt::<WsMessage>::flush(&mut self.ws).await.is_err() {
                        return None;
                    }
                    return Some(Message::Ping);
                }
                Ok(WsMessage::Pong(_)) => return Some(Message::Pong),
                Ok(WsMessage::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|frame| (u16::from(frame.code), frame.reason.to_string()))
                        .unzip();
                    if let Some(code) = code {
                        let reason = reason.clone().unwrap_or_default();
                        *self
                            .last_close
                            .lock()
                            .expect("close slot is never poisoned") = Some((code, reason));
                    }
                    return Some(Message::Close { code, reason });
                }
                Ok(WsMessage::Binary(_) | WsMessage::Frame(_)) => continue,
                Err(error) => {
                    tracing::debug!(%error, "live query socket read failed");
                    return None;
                }
            }
        }
    }

    async fn send(&mut self, message: Message) -> Result<(), ClientError> {
        let message = match message {
            Message::Text(text) => WsMessage::Text(text.into()),
            Message::Close { code, reason } => WsMessage::Close(code.map(|code| CloseFrame {
                code: code.into(),
                reason: reason.unwrap_or_default().into(),
            })),
            Message::Ping => WsMessage::Ping(Default::default()),
            Message::Pong => WsMessage::Pong(Default::default()),
        };
        self.ws
            .send(message)
            .await
            .map_err(|error| ClientError::Send(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn recognises_server_pings_and_keeps_their_payload() {
        assert_eq!(
            server_ping(r#"{"type":"ping","payload":{"message":"keepalive"}}"#),
            Some(Some(json!({"message": "keepalive"})))
        );
        assert_eq!(
            server_ping(r#"{"type":"ping","payload":{}}"#),
            Some(Some(json!({})))
        );
        assert_eq!(server_ping(r#"{"type":"ping"}"#), Some(None));
        assert_eq!(server_ping(r#"{"type":"ping","payload":null}"#), Some(None));
        assert_eq!(server_ping(r#"{"type":"pong"}"#), None);
        assert_eq!(
            server_ping(r#"{"type":"next","id":"1","payload":{"data":{"x":"ping"}}}"#),
            None
        );
        assert_eq!(server_ping("not json \"ping\""), None);
    }

    /// The pong mirrors the ping: its payload when it had one (Hasura's keep-alive, whose echo
    /// Hasura leaves unanswered), no payload when it had none.
    #[test]
    fn a_pong_carries_exactly_the_pings_payload() {
        let answer = |ping: &str| -> Value {
            serde_json::from_str(&pong(server_ping(ping).expect("a ping"))).expect("json")
        };
        assert_eq!(
            answer(r#"{"type":"ping","payload":{"message":"keepalive"}}"#),
            json!({"type": "pong", "payload": {"message": "keepalive"}})
        );
        assert_eq!(
            answer(r#"{"type":"ping","payload":{}}"#),
            json!({"type": "pong", "payload": {}})
        );
        assert_eq!(answer(r#"{"type":"ping"}"#), json!({"type": "pong"}));
        assert_eq!(
            answer(r#"{"type":"ping","payload":null}"#),
            json!({"type": "pong"})
        );
    }
}
