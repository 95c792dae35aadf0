//! The routes: `PUT /json_transport` on the TLS listener; `/healthz`, `/readyz` and `/metrics` on
//! both listeners (metrics only on the plain one).
//!
//! Every request gets an answer with a status that says what went wrong; errors map to HTTP in
//! [`ApiError`]'s `IntoResponse`, and nothing a request does can reach the agent's state except
//! through the agent.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;
use serde_json::json;
use whist_types::MandelboxId;

use crate::agent::AgentHandle;
use crate::agent::transport::{TransportError, TransportRequest};
use crate::metrics::Metrics;
use whist_auth::{AuthError, JwtVerifier, bearer_token};
use whist_serve::PerCallerLimit;

/// What the routes share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub agent: AgentHandle,
    /// `None` when this host runs without authentication (local mode only).
    pub verifier: Option<JwtVerifier>,
    pub metrics: Arc<Metrics>,
    /// Each caller's `json_transport` allowance (callers are known only with tokens).
    pub allowance: Arc<PerCallerLimit>,
}

/// The TLS listener's routes.
pub fn transport_router(state: AppState) -> axum::Router {
    let routes = axum::Router::new()
        .route("/json_transport", any(json_transport))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(
            whist_service_config::MAX_REQUEST_BODY_BYTES,
        ))
        .with_state(state);
    // Browser extensions call `json_transport` directly in development.
    whist_serve::cors(routes, &[Method::PUT, Method::OPTIONS])
}

/// The plain-HTTP operations listener's routes.
pub fn ops_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let status = state.agent.status();
    let code = if status.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "ready": status.ready(),
            "draining": status.draining,
            "mandelbox_rows_live": status.mandelboxes_live,
            "instance_row_live": status.instance_live,
            "docker_events_live": status.docker_events_live,
            "zygote_failures_in_a_row": status.zygote_failures,
        })),
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

/// The body clients send. Unknown fields (`ip`, `app_name`, `jwt_access_token`) are accepted and
/// ignored; the token comes from the `Authorization` header only.
#[derive(Debug, Deserialize)]
struct TransportBody {
    mandelbox_id: String,
    /// Required (the API says so); an empty string is an empty configuration.
    json_data: String,
}

async fn json_transport(State(state): State<AppState>, request: Request) -> Response {
    let method = request.method().clone();
    let result = match method {
        Method::PUT => handle_transport(&state, request).await,
        other => Err(ApiError::Method(other)),
    };
    let response = match result {
        Ok(ready) => (StatusCode::OK, Json(json!({ "result": ready }))).into_response(),
        Err(error) => error.into_response(),
    };
    state.metrics.transport_request(response.status().as_u16());
    response
}

/// The caller first (token, then its allowance), then the body: a stranger's or a spent
/// caller's megabytes are never read.
async fn handle_transport(
    state: &AppState,
    request: Request,
) -> Result<crate::agent::transport::SessionReady, ApiError> {
    let caller = match &state.verifier {
        Some(verifier) => {
            let token = bearer_token(request.headers())?;
            let subject = verifier.verify(token).await?.subject;
            if !state.allowance.allow(&subject) {
                return Err(ApiError::RateLimited);
            }
            Some(subject)
        }
        None => None,
    };
    let body: Result<Bytes, BytesRejection> = Bytes::from_request(request, &()).await;
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::Body(rejection.body_text())
        }
    })?;
    let body = parse_body(bytes).await?;
    let id: MandelboxId = body.mandelbox_id.trim().parse().map_err(|_| {
        ApiError::Body(format!(
            "mandelbox_id {:?} is not a UUID",
            body.mandelbox_id
        ))
    })?;
    // Decoded by the agent once the caller is known to own the box (the costly part).
    let (request, reply) = TransportRequest::new(id, caller, body.json_data);
    state.agent.transport(request).await;
    // The agent answers every request it takes; a dropped reply means it stopped meanwhile.
    reply
        .await
        .unwrap_or(Err(TransportError::Draining))
        .map_err(ApiError::Transport)
}

/// Bodies past this are parsed on a blocking thread: a caller's megabytes of JSON must not hold
/// an async worker that every other request on the host needs.
const PARSE_INLINE_BYTES: usize = 64 * 1024;

/// Parses the body (only after the caller's token was checked).
async fn parse_body(bytes: Bytes) -> Result<TransportBody, ApiError> {
    let small = bytes.len() <= PARSE_INLINE_BYTES;
    let parse = move || whist_serve::json_object::<TransportBody>(&bytes).map_err(ApiError::Body);
    if small {
        return parse();
    }
    tokio::task::spawn_blocking(parse)
        .await
        .unwrap_or_else(|_| Err(ApiError::Body("the body could not be parsed".to_owned())))
}

/// Every way a request can fail, each with its status.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("method {0} not allowed; use PUT")]
    Method(Method),
    #[error("malformed body: {0}")]
    Body(String),
    #[error(
        "the body is larger than {} bytes",
        whist_service_config::MAX_REQUEST_BODY_BYTES
    )]
    TooLarge,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("too many json_transport requests from this caller; retry in a second")]
    RateLimited,
    #[error(transparent)]
    Transport(TransportError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Auth(AuthError::JwksUnavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Auth(_) => StatusCode::UNAUTHORIZED,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Transport(error) => match error {
                TransportError::UnknownMandelbox => StatusCode::NOT_FOUND,
                TransportError::NotYours => StatusCode::FORBIDDEN,
                TransportError::Repeated => StatusCode::CONFLICT,
                TransportError::NotReady(_) => StatusCode::GATEWAY_TIMEOUT,
                TransportError::Gone => StatusCode::GONE,
                TransportError::Draining | TransportError::Unavailable => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                TransportError::BadConfig => StatusCode::BAD_REQUEST,
                TransportError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl ApiError {
    /// What the caller is told: what it did wrong, never how this host failed inside. Failures
    /// that are not the caller's get an id that the log line with the details carries too.
    fn body(&self) -> serde_json::Value {
        let internal = match self {
            Self::Auth(AuthError::JwksUnavailable(_)) => {
                Some("the token issuer's signing keys cannot be fetched; try again")
            }
            Self::Transport(TransportError::Internal(_)) => {
                Some("the host failed to start the session")
            }
            _ => None,
        };
        match internal {
            Some(message) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                tracing::error!(error.id = %id, error = %self, "json_transport failed");
                json!({ "error": message, "error_id": id })
            }
            None => json!({ "error": self.to_string() }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(self.body())).into_response();
        if let Self::Method(_) = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("PUT, OPTIONS"));
        }
        if let Self::RateLimited = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
