//! The accept loop both services serve HTTP with (plain, or TLS for the hosts' `json_transport`),
//! and the limits every listener has, so that no client can slow the others beyond a bound or
//! take a service down:
//!
//! - **connections:** at most [`Limits::max_connections`] open at once, and at most
//!   [`Limits::max_connections_per_peer`] from one address; past either, a new connection is
//!   closed as soon as it is accepted, so its descriptor is back at once (a flood can never use
//!   up the process's file descriptors);
//! - **time:** a TLS handshake within [`Limits::handshake`], each request's headers within
//!   [`Limits::header_read`] (slowloris), its body within [`Limits::body_read`] (a slow body),
//!   and the whole request within [`Limits::request`];
//! - **work:** at most [`Limits::max_in_flight`] requests handled at once; past it the answer
//!   is 503 with `Retry-After`, at once, instead of a queue that grows.
//!
//! Beside the accept loop: [`cors`] for the browser-facing routes, [`PerCallerLimit`] (the
//! per-caller allowance both services put on their costly routes) and [`pinned`], the client
//! side of a host's self-made certificate.
//!
//! On shutdown the listener closes, open connections are told to finish (HTTP/1 after the
//! response in flight, HTTP/2 with GOAWAY) and get a grace period before being dropped.

mod cors;
mod json_body;
mod per_caller;
pub mod pinned;

pub use cors::cors;
pub use json_body::json_object;
pub use per_caller::PerCallerLimit;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tracing::{debug, info, warn};

/// HTTP/2 connections are pinged this often when idle, and closed when a ping goes unanswered
/// for [`HTTP2_KEEP_ALIVE_TIMEOUT`], so vanished peers do not keep connections open.
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Pause after an `accept` error that is not about one connection (out of file descriptors,
/// out of memory): retrying at once would spin and flood the log, and those conditions take a
/// moment to clear. hyper's old accept loop and axum::serve use one second too.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// What one listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub max_in_flight: usize,
    pub handshake: Duration,
    pub header_read: Duration,
    pub body_read: Duration,
    pub request: Duration,
}

impl Default for Limits {
    /// Well under the usual 1,024 file descriptors; a request (a proxied `json_transport`
    /// waits up to its host's readiness) within a minute.
    fn default() -> Self {
        Self {
            max_connections: 768,
            max_connections_per_peer: 128,
            max_in_flight: 256,
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(20),
            request: Duration::from_secs(60),
        }
    }
}

/// `router` with the per-request limits: its body within [`Limits::body_read`] and the whole
/// request within [`Limits::request`] (408 past either), and at most [`Limits::max_in_flight`]
/// requests at once across all its routes (503 at once past it, never a queue).
pub fn bounded(router: Router, limits: &Limits) -> Router {
    router
        .layer(RequestBodyTimeoutLayer::new(limits.body_read))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    overloaded()
                }))
                .load_shed()
                // Global: the router applies a layer to each route, and one limit must hold
                // across all of them.
                .layer(GlobalConcurrencyLimitLayer::new(limits.max_in_flight)),
        )
}

/// The answer when every request slot is taken.
fn overloaded() -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({
            "error": "the service is handling as many requests as it takes; try again shortly"
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Counts open connections, in all and per peer address.
#[derive(Debug, Default)]
struct Connections {
    open: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection; leaving gives its place back.
struct Admitted {
    table: Arc<Mutex<Connections>>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.open = table.open.saturating_sub(1);
        if let Some(count) = table.per_peer.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.per_peer.remove(&self.peer);
            }
        }
    }
}

fn admit(table: &Arc<Mutex<Connections>>, peer: IpAddr, limits: &Limits) -> Option<Admitted> {
    let mut connections = table.lock().unwrap_or_else(PoisonError::into_inner);
    let from_peer = connections.per_peer.get(&peer).copied().unwrap_or(0);
    if connections.open >= limits.max_connections || from_peer >= limits.max_connections_per_peer {
        return None;
    }
    connections.open += 1;
    *connections.per_peer.entry(peer).or_default() += 1;
    Some(Admitted {
        table: table.clone(),
        peer,
    })
}

/// Serves `app` (already [`bounded`]) on `listener` until `shutdown`, over TLS when `tls` is
/// given (HTTP/1.1 and HTTP/2 by ALPN), then lets open connections finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT);
    // Owning the connection tasks lets us wait for them on shutdown and abort the stragglers
    // when the grace period is over; each connection watches the cancellation token itself.
    let mut connections = JoinSet::new();
    let table = Arc::new(Mutex::new(Connections::default()));
    let mut refused: u64 = 0;

    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = acceptor.is_some(), "serving");
    }
    loop {
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => {
                debug!(%error, "connection failed before accept");
                continue;
            }
            Err(error) => {
                warn!(%error, "accept failed; retrying shortly");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        let Some(admitted) = admit(&table, peer.ip(), &limits) else {
            // Closed at once: the descriptor is free again before the next accept.
            drop(stream);
            refused += 1;
            if refused.is_power_of_two() {
                warn!(%peer, refused, "connection limit reached; closing new connections");
            }
            continue;
        };
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let _admitted = admitted;
            match acceptor {
                None => serve_connection(builder, stream, service, peer, shutdown).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(limits.handshake, acceptor.accept(stream));
                    let tls_stream = tokio::select! {
                        // A connection that has not even said hello is not worth a grace period.
                        () = shutdown.cancelled() => return,
                        handshake = handshake => match handshake {
                            Ok(Ok(tls_stream)) => tls_stream,
                            Ok(Err(error)) => {
                                debug!(%peer, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        },
                    };
                    serve_connection(builder, tls_stream, service, peer, shutdown).await;
                }
            }
        });
    }

    drop(listener);
    let open = connections.len();
    if open > 0 {
        debug!(open, "asking open connections to finish");
    }
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        info!(
            remaining = connections.len(),
            "grace period over; dropping connections still open"
        );
    }
    connections.shutdown().await;
    Ok(())
}

async fn serve_connection<IO>(
    builder: auto::Builder<TokioExecutor>,
    stream: IO,
    service: TowerToHyperService<Router>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%peer, %error, "connection ended with an error");
    }
}

/// `accept` errors about one incoming connection (it was reset or aborted before we took it),
/// after which the next `accept` can go ahead at once.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_admitted_within_both_limits_and_give_their_place_back() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let table = Arc::new(Mutex::new(Connections::default()));
        let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
        let first = admit(&table, a, &limits).expect("room");
        let second = admit(&table, a, &limits).expect("room");
        assert!(admit(&table, a, &limits).is_none(), "a's share is used");
        let third = admit(&table, b, &limits).expect("b has its own share");
        assert!(admit(&table, b, &limits).is_none(), "the total is used");
        drop(first);
        assert!(admit(&table, b, &limits).is_some(), "a place came back");
        drop((second, third));
    }

    /// Requests past the in-flight bound get 503 at once rather than a queue.
    #[tokio::test]
    async fn requests_past_the_in_flight_bound_are_shed() {
        let release = Arc::new(tokio::sync::Notify::new());
        let waiting = release.clone();
        let limits = Limits {
            max_in_flight: 2,
            ..Limits::default()
        };
        let app = bounded(
            Router::new().route(
                "/",
                axum::routing::get(move || {
                    let waiting = waiting.clone();
                    async move {
                        waiting.notified().await;
                        "done"
                    }
                }),
            ),
            &limits,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            None,
            limits,
            stop.clone(),
            Duration::from_secs(1),
        ));
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/");
        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(client.get(&url).send()))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let shed = client.get(&url).send().await.expect("answer");
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()["retry-after"], "1");
        release.notify_waiters();
        for request in held {
            let response = request.await.expect("task").expect("answer");
            assert_eq!(response.status(), 200);
        }
        stop.cancel();
        server.await.expect("task").expect("served");
    }
}
