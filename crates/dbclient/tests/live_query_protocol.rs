//! The live-query client against a scripted websocket peer that behaves as Hasura does: a ping
//! before `connection_ack`, keep-alive pings with a payload, a new ping in answer to any pong
//! that is not the keep-alive's echo, and the protocol's close codes. Proves there is no
//! ping/pong loop, that a pong mirrors its ping's payload (none for none), and that every kind of
//! failure ends in a clean reconnect. Needs no stack.
//!
//! Hasura's rules, from hasura/graphql-engine `server/src-lib/Hasura/GraphQL/Transport/WebSocket.hs`:
//! `onPing wsConn mPayload = sendMsg wsConn (SMPong mPayload)`, and `onPong` answers
//! `Just message` with `SMPing mPayload` unless `message == keepAliveMessage`, and `Nothing` with
//! `SMPing Nothing`; `keepAliveMessage` is `{"message":"keepalive"}` (`.../WebSocket/Protocol.hs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::{TokioAdapter, accept_hdr_async};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::handshake::server::{Request, Response};
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use whist_dbclient::{HasuraClient, HasuraConfig, LiveOptions, Snapshot, Subscription, live};
use whist_types::Instance;

type Socket = WebSocketStream<TokioAdapter<TcpStream>>;

const SECRET: &str = "peer-secret";
const KEEPALIVE_PAYLOAD: &str = r#"{"message":"keepalive"}"#;

/// What the peer observed, for the test to check.
#[derive(Debug, Default)]
struct Observed {
    connections: usize,
    subprotocol_missing: usize,
    wrong_secret: usize,
    pings_sent: usize,
    pongs_with_payload: usize,
    pongs_without_payload: usize,
    /// Each probe ping the peer sent and the exact message that answered it.
    probes: Vec<(Value, Value)>,
}

/// How the peer treats one connection, by its number (0-based).
#[derive(Debug, Clone, Copy)]
enum Script {
    /// Ack, send `instances` rows, send `keepalives` pings, then close with `code`.
    ServeThenClose {
        instances: usize,
        keepalives: usize,
        code: u16,
    },
    /// Ack, send rows, then go silent (read and ignore everything, answer nothing).
    ServeThenSilence { instances: usize },
    /// Ack, then send a message that is not JSON.
    Garbage,
    /// Ack, then a `next` whose rows do not decode.
    BadRows,
    /// Ack, send rows, keep sending keep-alives until the client goes.
    ServeForever { instances: usize },
    /// Ack, send rows, send [`probe_pings`] one at a time recording each answer, then serve
    /// keep-alives until the client goes.
    ProbePings { instances: usize },
}

/// Pings of every shape the protocol allows.
fn probe_pings() -> [Value; 4] {
    [
        json!({"type": "ping"}),
        json!({"type": "ping", "payload": null}),
        json!({"type": "ping", "payload": {}}),
        json!({"type": "ping", "payload": {"message": "probe"}}),
    ]
}

struct Peer {
    url: String,
    observed: Arc<Mutex<Observed>>,
}

async fn start_peer(scripts: Vec<Script>) -> Peer {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!(
        "ws://{}/v1/graphql",
        listener.local_addr().expect("address")
    );
    let observed = Arc::new(Mutex::new(Observed::default()));
    let state = observed.clone();
    tokio::spawn(async move {
        let mut number = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let script = scripts
                .get(number)
                .copied()
                .unwrap_or(Script::ServeForever { instances: 0 });
            number += 1;
            tokio::spawn(serve(stream, script, state.clone()));
        }
    });
    Peer { url, observed }
}

async fn serve(stream: TcpStream, script: Script, observed: Arc<Mutex<Observed>>) {
    let missing_protocol = Arc::new(Mutex::new(false));
    let flag = missing_protocol.clone();
    #[allow(
        clippy::result_large_err,
        reason = "the handshake callback's signature is tungstenite's"
    )]
    let callback = move |request: &Request, mut response: Response| {
        let offered = request
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.split(',').any(|p| p.trim() == "graphql-transport-ws"));
        *flag.lock().expect("flag") = !offered;
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("graphql-transport-ws"),
        );
        Ok(response)
    };
    let Ok(mut ws) = accept_hdr_async(stream, callback).await else {
        return;
    };
    {
        let mut observed = observed.lock().expect("observed");
        observed.connections += 1;
        if *missing_protocol.lock().expect("flag") {
            observed.subprotocol_missing += 1;
        }
    }

    // connection_init must carry the admin secret.
    let Some(init) = next_json(&mut ws).await else {
        return;
    };
    if init["type"] != "connection_init"
        || init["payload"]["headers"]["x-hasura-admin-secret"] != SECRET
    {
        observed.lock().expect("observed").wrong_secret += 1;
    }
    // Hasura may ping before it acknowledges.
    send_ping(&mut ws, &observed).await;
    let Some(pong) = next_json(&mut ws).await else {
        return;
    };
    record_pong(&pong, &observed);
    send_json(&mut ws, json!({"type": "connection_ack"})).await;
    let Some(subscribe) = next_json(&mut ws).await else {
        return;
    };
    let id = subscribe["id"].as_str().unwrap_or("1").to_owned();

    match script {
        Script::ServeThenClose {
            instances,
            keepalives,
            code,
        } => {
            send_rows(&mut ws, &id, instances).await;
            for _ in 0..keepalives {
                if !keepalive_round(&mut ws, &observed).await {
                    return;
                }
            }
            let _ = ws
                .close(Some(CloseFrame {
                    code: code.into(),
                    reason: "scripted close".into(),
                }))
                .await;
        }
        Script::ServeThenSilence { instances } => {
            send_rows(&mut ws, &id, instances).await;
            while ws.next().await.is_some() {}
        }
        Script::Garbage => {
            let _ = ws.send(Message::Text("this is not json".into())).await;
            while ws.next().await.is_some() {}
        }
        Script::BadRows => {
            send_json(&mut ws, json!({"type": "next", "id": id, "payload": {"data": {"whist_instances": [{"id": 5}]}}})).await;
            while ws.next().await.is_some() {}
        }
        Script::ServeForever { instances } => {
            send_rows(&mut ws, &id, instances).await;
            while keepalive_round(&mut ws, &observed).await {}
        }
        Script::ProbePings { instances } => {
            send_rows(&mut ws, &id, instances).await;
            for ping in probe_pings() {
                send_json(&mut ws, ping.clone()).await;
                // The answer is recorded, not answered: following Hasura's rule here would
                // bounce a payload-less pong back as a payload-less ping forever.
                let Some(answer) = next_json(&mut ws).await else {
                    return;
                };
                observed
                    .lock()
                    .expect("observed")
                    .probes
                    .push((ping, answer));
            }
            while keepalive_round(&mut ws, &observed).await {}
        }
    }
}

/// Sends a keep-alive ping and answers pongs as Hasura does until the next interval. Returns
/// false once the client is gone.
async fn keepalive_round(ws: &mut Socket, observed: &Arc<Mutex<Observed>>) -> bool {
    send_ping(ws, observed).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(30);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return true,
            Ok(None | Some(Err(_))) => return false,
            Ok(Some(Ok(Message::Text(text)))) => {
                let message: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                match message["type"].as_str() {
                    // Hasura's `onPong`: any pong but the keep-alive's echo is answered with a
                    // ping carrying the pong's payload, or none.
                    Some("pong") if !record_pong(&message, observed) => {
                        observed.lock().expect("observed").pings_sent += 1;
                        let ping = match message.get("payload") {
                            Some(payload) => json!({"type": "ping", "payload": payload}),
                            None => json!({"type": "ping"}),
                        };
                        send_json(ws, ping).await;
                    }
                    Some("ping") => send_json(ws, json!({"type": "pong"})).await,
                    _ => {}
                }
            }
            Ok(Some(Ok(Message::Close(_)))) => return false,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Counts a pong; true when it echoed the keep-alive payload.
fn record_pong(message: &Value, observed: &Arc<Mutex<Observed>>) -> bool {
    let expected: Value = serde_json::from_str(KEEPALIVE_PAYLOAD).expect("payload");
    let mut observed = observed.lock().expect("observed");
    let echoed = message["type"] == "pong" && message["payload"] == expected;
    if echoed {
        observed.pongs_with_payload += 1;
    } else {
        observed.pongs_without_payload += 1;
    }
    echoed
}

async fn send_ping(ws: &mut Socket, observed: &Arc<Mutex<Observed>>) {
    observed.lock().expect("observed").pings_sent += 1;
    let payload: Value = serde_json::from_str(KEEPALIVE_PAYLOAD).expect("payload");
    send_json(ws, json!({"type": "ping", "payload": payload})).await;
}

async fn send_rows(ws: &mut Socket, id: &str, count: usize) {
    let rows: Vec<Value> = (0..count).map(instance_json).collect();
    send_json(
        ws,
        json!({"type": "next", "id": id, "payload": {"data": {"whist_instances": rows}}}),
    )
    .await;
}

fn instance_json(n: usize) -> Value {
    json!({
        "id": format!("i-{n}"), "provider": "AWS", "region": "us-east-1", "image_id": "ami-1",
        "client_sha": "abc", "ip_addr": "10.0.0.1", "instance_type": "g4dn.2xlarge",
        "remaining_capacity": 2, "status": "ACTIVE",
        "created_at": "2026-11-23T00:00:00+00:00", "updated_at": "2026-11-23T00:00:00+00:00",
        "fleet": "whist-test", "heartbeat_at": "2026-11-23T00:00:00+00:00"
    })
}

async fn send_json(ws: &mut Socket, value: Value) {
    let _ = ws.send(Message::Text(value.to_string().into())).await;
}

async fn next_json(ws: &mut Socket) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return serde_json::from_str(text.as_str()).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn subscribe(peer: &Peer, keep_alive: Duration) -> Subscription<Instance> {
    whist_logging::init_for_tests();
    let config = HasuraConfig::new(
        peer.url.replace("ws://", "http://").parse().expect("url"),
        Some(SECRET.into()),
    );
    let options = LiveOptions {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        keep_alive_interval: keep_alive,
        keep_alive_retries: 1,
    };
    HasuraClient::new(config).subscribe_with(live::queries::instances(), options)
}

async fn next_snapshot(subscription: &mut Subscription<Instance>) -> Snapshot<Instance> {
    tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("a snapshot in time")
        .expect("subscription running")
}

async fn wait_for_connections(peer: &Peer, count: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while peer.observed.lock().expect("observed").connections < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the client did not reconnect ({count} connections expected)"));
}

#[tokio::test]
async fn hasura_keepalives_cause_no_ping_pong_loop_and_close_codes_reconnect() {
    let peer = start_peer(vec![
        Script::ServeThenClose {
            instances: 1,
            keepalives: 10,
            code: 4400,
        },
        Script::ServeThenClose {
            instances: 2,
            keepalives: 2,
            code: 4401,
        },
        Script::ServeThenClose {
            instances: 3,
            keepalives: 2,
            code: 4403,
        },
        Script::ServeThenClose {
            instances: 2,
            keepalives: 2,
            code: 4409,
        },
        Script::ServeForever { instances: 4 },
    ])
    .await;
    let mut subscription = subscribe(&peer, Duration::from_secs(5));

    let mut sizes = Vec::new();
    while sizes.last() != Some(&4) {
        let snapshot = next_snapshot(&mut subscription).await;
        assert!(
            snapshot.after_connect,
            "each scripted connection sends one snapshot"
        );
        sizes.push(snapshot.rows.len());
    }
    assert_eq!(
        sizes,
        [1, 2, 3, 2, 4],
        "every close code was followed by a reconnect"
    );

    let observed = peer.observed.lock().expect("observed");
    assert_eq!(
        observed.subprotocol_missing, 0,
        "graphql-transport-ws is always requested"
    );
    assert_eq!(
        observed.wrong_secret, 0,
        "the admin secret is in connection_init"
    );
    assert_eq!(
        observed.pongs_without_payload, 0,
        "a pong always echoes the ping's payload"
    );
    assert!(
        observed.pongs_with_payload <= observed.pings_sent,
        "one pong per ping, no loop: {observed:?}"
    );
    assert!(
        observed.pongs_with_payload >= 15,
        "pings were answered: {observed:?}"
    );
}

/// Server pings the client answers itself: each pong carries the ping's payload, and a ping
/// without one (absent or `null`) gets a pong without one, not `"payload": {}`.
#[tokio::test]
async fn a_pong_mirrors_its_pings_payload() {
    let peer = start_peer(vec![Script::ProbePings { instances: 1 }]).await;
    let mut subscription = subscribe(&peer, Duration::from_secs(5));
    assert_eq!(next_snapshot(&mut subscription).await.rows.len(), 1);
    tokio::time::timeout(Duration::from_secs(10), async {
        while peer.observed.lock().expect("observed").probes.len() < probe_pings().len() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every probe ping was answered");

    let observed = peer.observed.lock().expect("observed");
    let answers: Vec<&Value> = observed.probes.iter().map(|(_, answer)| answer).collect();
    assert_eq!(
        answers,
        [
            &json!({"type": "pong"}),
            &json!({"type": "pong"}),
            &json!({"type": "pong", "payload": {}}),
            &json!({"type": "pong", "payload": {"message": "probe"}}),
        ],
        "{:?}",
        observed.probes
    );
    assert_eq!(observed.connections, 1, "the probes cost no reconnect");
}

#[tokio::test]
async fn a_silent_connection_is_replaced_after_the_keepalive_deadline() {
    let peer = start_peer(vec![
        Script::ServeThenSilence { instances: 1 },
        Script::ServeForever { instances: 2 },
    ])
    .await;
    let mut subscription = subscribe(&peer, Duration::from_millis(100));
    assert_eq!(next_snapshot(&mut subscription).await.rows.len(), 1);
    let snapshot = next_snapshot(&mut subscription).await;
    assert!(snapshot.after_connect);
    assert_eq!(snapshot.added.len(), 1, "the diff spans the reconnect");
    assert_eq!(peer.observed.lock().expect("observed").connections, 2);
}

#[tokio::test]
async fn malformed_server_messages_end_in_a_reconnect_not_a_panic() {
    let peer = start_peer(vec![
        Script::Garbage,
        Script::BadRows,
        Script::ServeForever { instances: 3 },
    ])
    .await;
    let mut subscription = subscribe(&peer, Duration::from_secs(5));
    let snapshot = next_snapshot(&mut subscription).await;
    assert_eq!(snapshot.rows.len(), 3, "bad messages produced no snapshot");
    wait_for_connections(&peer, 3).await;
}

#[tokio::test]
async fn an_unreachable_engine_is_retried_forever_with_backoff() {
    // Bind and drop, so nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let peer = Peer {
        url: format!("ws://127.0.0.1:{port}/v1/graphql"),
        observed: Arc::default(),
    };
    let subscription = subscribe(&peer, Duration::from_secs(5));
    let mut state = subscription.state_watch();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|state| matches!(state, whist_dbclient::ConnectionState::Waiting { attempt, .. } if *attempt >= 4)),
    )
    .await
    .expect("still retrying")
    .expect("state channel open");
}
