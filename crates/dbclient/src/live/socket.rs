//! The websocket under a live query, adapted to graphql-ws-client.
//!
//! graphql-ws-client answers every protocol `ping` with a `pong` that has no payload, and Hasura
//! answers a payload-less `pong` with another `ping`: together they can bounce messages forever.
//! This adapter answers server pings itself, echoing the payload (or `{}` when there is none),
//! and hands the client only a websocket-level `Pong`, which the client ignores except to note
//! that the connection is alive (its keep-alive timer restarts on every message).

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

/// The payload of a protocol-level `ping` from the server, if `text` is one.
fn server_ping(text: &str) -> Option<Value> {
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
            .unwrap_or_else(|| Value::Object(Default::default()))
    })
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
                        let pong = serde_json::json!({ "type": "pong", "payload": payload });
                        if self
                            .ws
                            .send(WsMessage::Text(pong.to_string().into()))
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
            Some(json!({"message": "keepalive"}))
        );
        assert_eq!(
            server_ping(r#"{"type":"ping"}"#),
            Some(json!({})),
            "never answer without a payload"
        );
        assert_eq!(
            server_ping(r#"{"type":"ping","payload":null}"#),
            Some(json!({}))
        );
        assert_eq!(server_ping(r#"{"type":"pong"}"#), None);
        assert_eq!(
            server_ping(r#"{"type":"next","id":"1","payload":{"data":{"x":"ping"}}}"#),
            None
        );
        assert_eq!(server_ping("not json \"ping\""), None);
    }
}
