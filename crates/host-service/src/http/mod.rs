//! The host's HTTP surface: `json_transport` over TLS, health and metrics.

pub mod routes;
pub mod tls;

pub use tls::{SelfSigned, TlsError, self_signed, serve_tls};
pub use whist_auth::{AuthError, Claims, JwtConfig, JwtVerifier, bearer_token};
