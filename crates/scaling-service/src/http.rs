//! The HTTP API: `POST /mandelbox/assign`, `PUT /json_transport` (proxied to the host holding the
//! caller's mandelbox), `/healthz`, `/readyz`, `/metrics`. Every failure maps to its status in
//! [`ApiError`]'s `IntoResponse`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use whist_auth::{AuthError, JwtVerifier, bearer_token};
use whist_dbclient::{HasuraClient, ops};
use whist_serve::PerCallerLimit;
use whist_types::{MandelboxId, MandelboxWithInstance};

use crate::assign::{AssignError, AssignRequest, Assigner};
use crate::fleet::FleetView;
use crate::metrics::Metrics;
use crate::pinned::PinnedClients;

/// The port every host serves `json_transport` on.
pub const HOST_TRANSPORT_PORT: u16 = 4678;

#[derive(Debug, Clone)]
pub struct AppState {
    pub assigner: Assigner,
    pub fleet: FleetView,
    pub db: HasuraClient,
    /// `None` only in local development: callers name themselves in the body.
    pub verifier: Option<JwtVerifier>,
    pub metrics: Arc<Metrics>,
    /// Each caller's assign allowance.
    pub limiter: Arc<PerCallerLimit>,
    /// HTTPS to hosts, each pinned to the certificate its row publishes.
    pub proxy: Arc<PinnedClients>,
    pub leader: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> axum::Router {
    let routes = axum::Router::new()
        .route("/mandelbox/assign", any(assign))
        .route("/json_transport", any(json_transport))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // The hosts' limit too, so a body is refused (413) the same whichever way it comes.
        .layer(DefaultBodyLimit::max(
            whist_service_config::MAX_REQUEST_BODY_BYTES,
        ))
        .with_state(state);
    whist_serve::cors(routes, &[Method::POST, Method::PUT, Method::OPTIONS])
}

async fn readyz(State(state): State<AppState>) -> Response {
    let live = state.fleet.live();
    let complete = state.fleet.current().complete;
    let status = if live && complete {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "live_queries": live, "fleet_loaded": complete, "leader": *state.leader.borrow() })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The body (within [`DefaultBodyLimit`]: 413 past it).
async fn read_body(request: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, &())
        .await
        .map_err(|rejection: BytesRejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::Body(rejection.body_text())
            }
        })
}

async fn assign(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let result = match request.method().clone() {
        Method::POST => handle_assign(&state, request).await,
        other => Err(ApiError::Method(other, "POST, OPTIONS")),
    };
    let (outcome, response) = match result {
        Ok(assignment) => (
            "assigned",
            (
                StatusCode::OK,
                Json(json!({
                    "ip": assignment.ip,
                    "mandelbox_id": assignment.mandelbox_id,
                    "error": "",
                })),
            )
                .into_response(),
        ),
        Err(ApiError::Assign(error)) => (
            error.code(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "ip": "",
                    "mandelbox_id": MandelboxId(uuid::Uuid::nil()),
                    "error": error.code(),
                })),
            )
                .into_response(),
        ),
        Err(error) => ("bad_request", error.into_response()),
    };
    state.metrics.assigned(outcome, started.elapsed());
    response
}

/// The caller first (token, then its allowance), then the body: a stranger's megabytes cost
/// this service nothing.
async fn handle_assign(
    state: &AppState,
    request: Request,
) -> Result<crate::assign::Assignment, ApiError> {
    let caller = caller(state, request.headers()).await?;
    if let Some(subject) = &caller
        && !state.limiter.allow(subject)
    {
        return Err(ApiError::RateLimited);
    }
    let body = read_body(request).await?;
    let request: AssignRequest = whist_serve::json_object(&body)
        .map_err(|error| ApiError::Body(format!("malformed body: {error}")))?;
    request
        .check()
        .map_err(|error| ApiError::Body(format!("malformed body: {error}")))?;
    let user = match (caller, &request.user_id) {
        (Some(subject), _) => subject,
        // Without token checks (local, loopback only) callers name themselves, and the
        // allowance is that name's.
        (None, Some(user)) if !user.trim().is_empty() => {
            let user = user.trim().to_owned();
            if !state.limiter.allow(&user) {
                return Err(ApiError::RateLimited);
            }
            user
        }
        (None, _) => {
            return Err(ApiError::Body(
                "user_id is required when the service runs without token checks".to_owned(),
            ));
        }
    };
    state
        .assigner
        .assign(&request, &user)
        .await
        .map_err(ApiError::Assign)
}

/// The token's subject, or `None` when tokens are not checked.
async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match &state.verifier {
        Some(verifier) => {
            let token = bearer_token(headers)?;
            Ok(Some(verifier.verify(token).await?.subject))
        }
        None => Ok(None),
    }
}

#[derive(Debug, Deserialize)]
struct TransportBody {
    mandelbox_id: String,
}

async fn json_transport(State(state): State<AppState>, request: Request) -> Response {
    match request.method().clone() {
        Method::PUT => match proxy_transport(&state, request).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        },
        other => ApiError::Method(other, "PUT, OPTIONS").into_response(),
    }
}

/// Forwards the caller's `json_transport` to the host of the caller's own mandelbox, and only
/// there; the host's status and body come back unchanged.
async fn proxy_transport(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let caller = caller(state, request.headers()).await?;
    // Forwarded as it came, so the host checks the same token.
    let authorization = request.headers().get(header::AUTHORIZATION).cloned();
    let body = read_body(request).await?;
    let parsed: TransportBody = whist_serve::json_object(&body)
        .map_err(|error| ApiError::Body(format!("malformed body: {error}")))?;
    let id: MandelboxId = parsed.mandelbox_id.trim().parse().map_err(|_| {
        ApiError::Body(format!(
            "mandelbox_id {:?} is not a UUID",
            parsed.mandelbox_id
        ))
    })?;
    // The box and its host in one read: this is on every session start's path.
    let MandelboxWithInstance {
        mandelbox,
        instance,
    } = state
        .db
        .execute(&ops::mandelbox_with_instance(id))
        .await
        .map_err(|error| ApiError::Unavailable(error.to_string()))?
        .ok_or(ApiError::UnknownMandelbox)?;
    if let Some(caller) = &caller
        && mandelbox.user_id.as_deref() != Some(caller.as_str())
    {
        return Err(ApiError::NotYours);
    }
    let ip = instance
        .ip()
        .filter(|ip| routable_host(*ip))
        .ok_or(ApiError::UnknownMandelbox)?;
    // Only the certificate the host published: anything else at its address gets nothing.
    let proxy = instance
        .tls_fingerprint
        .as_deref()
        .and_then(|fingerprint| state.proxy.pinned_to(fingerprint))
        .ok_or(ApiError::HostUnverified)?;
    let url = format!(
        "https://{}/json_transport",
        std::net::SocketAddr::new(ip, HOST_TRANSPORT_PORT)
    );
    let mut request = proxy
        .put(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    let response = request.send().await.map_err(|error| {
        if error.is_timeout() {
            ApiError::HostTimeout
        } else {
            ApiError::HostUnreachable(error.to_string())
        }
    })?;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = response
        .bytes()
        .await
        .map_err(|error| ApiError::HostUnreachable(error.to_string()))?;
    let mut reply = (status, bytes).into_response();
    if let Some(content_type) = content_type {
        reply
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    Ok(reply)
}

/// Addresses a host can have: never link-local (the cloud's metadata service lives there),
/// multicast or unspecified. Loopback stays allowed for hosts on a developer's machine.
fn routable_host(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_link_local() || v4.is_multicast() || v4.is_unspecified() || v4.is_broadcast())
        }
        std::net::IpAddr::V6(v6) => {
            !(v6.is_multicast() || v6.is_unspecified() || v6.is_unicast_link_local())
        }
    }
}

/// Everything that is not a business refusal of an assign.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// The method, and the `Allow` header value.
    #[error("method {0} not allowed; use {1}")]
    Method(Method, &'static str),
    #[error("{0}")]
    Body(String),
    #[error(
        "the body is larger than {} bytes",
        whist_service_config::MAX_REQUEST_BODY_BYTES
    )]
    TooLarge,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("too many requests; slow down")]
    RateLimited,
    #[error("no such mandelbox")]
    UnknownMandelbox,
    #[error("this mandelbox is not assigned to you")]
    NotYours,
    /// The database failed; the detail is logged, never sent.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The host failed; the detail is logged, never sent.
    #[error("the mandelbox's host did not answer: {0}")]
    HostUnreachable(String),
    #[error("the mandelbox's host did not answer in time")]
    HostTimeout,
    #[error("the mandelbox's host has not published its certificate")]
    HostUnverified,
    #[error("{}", .0.code())]
    Assign(AssignError),
}

impl ApiError {
    /// What the caller is told: what it did wrong, never how this service failed inside.
    /// Failures that are not the caller's get an id that the log line with the details carries.
    fn body(&self) -> serde_json::Value {
        let internal = match self {
            Self::Auth(AuthError::JwksUnavailable(_)) => {
                Some("the token issuer's signing keys cannot be fetched; try again")
            }
            Self::Unavailable(_) | Self::HostUnreachable(_) | Self::HostTimeout => {
                Some(self.public_message())
            }
            _ => None,
        };
        match internal {
            Some(message) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                tracing::warn!(error.id = %id, error = %self, "request failed");
                json!({ "error": message, "error_id": id })
            }
            None => json!({ "error": self.to_string() }),
        }
    }

    fn public_message(&self) -> &'static str {
        match self {
            Self::HostUnreachable(_) => "the mandelbox's host did not answer",
            Self::HostTimeout => "the mandelbox's host did not answer in time",
            _ => "the database is unavailable; try again",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Method(..) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Auth(AuthError::JwksUnavailable(_)) | Self::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::UnknownMandelbox => StatusCode::NOT_FOUND,
            Self::NotYours => StatusCode::FORBIDDEN,
            Self::HostUnreachable(_) | Self::HostUnverified => StatusCode::BAD_GATEWAY,
            Self::HostTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Assign(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut response = (status, Json(self.body())).into_response();
        match &self {
            Self::Method(_, allowed) => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            Self::RateLimited => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Auth(_) if status == StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_never_targets_link_local_or_multicast_addresses() {
        for bad in ["169.254.169.254", "0.0.0.0", "224.0.0.1", "fe80::1", "::"] {
            assert!(!routable_host(bad.parse().expect("ip")), "{bad}");
        }
        for good in ["203.0.113.7", "10.0.0.5", "127.0.0.1", "2001:db8::1"] {
            assert!(routable_host(good.parse().expect("ip")), "{good}");
        }
    }
}
