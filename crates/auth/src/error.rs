//! Why a request is not authenticated, and which HTTP status that deserves.
//!
//! Every check in the crate reports through [`AuthError`], so the services map failures to
//! responses in one place ([`AuthError::status_code`]) instead of each deciding for itself
//! whose fault a failure is.

use http::StatusCode;

/// Why a request is not authenticated.
///
/// Only [`AuthError::JwksUnavailable`] is the server's problem (HTTP 503); every other variant
/// is the client's (HTTP 401); see [`AuthError::status_code`]. The messages are meant for logs:
/// they say exactly what was wrong, which a client should usually not be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no Authorization header")]
    MissingToken,
    /// The `Authorization` header is not `Bearer <token>` (or the token is empty, `undefined`
    /// or `null`, which broken clients send).
    #[error("Authorization header is not `Bearer <token>`")]
    MalformedHeader,
    /// The token is not acceptable; the message says which check failed.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token's `kid` is not in the issuer's JWKS, even after refetching it.
    #[error("token signed with unknown key `{kid}`")]
    UnknownKey {
        /// The `kid` from the token header.
        kid: String,
    },
    /// The JWKS could not be fetched or made no sense, so the token could not be checked.
    #[error("signing keys unavailable: {0}")]
    JwksUnavailable(String),
}

impl AuthError {
    /// The HTTP status to answer with: 503 when the keys are unavailable (retrying later may
    /// succeed and the client did nothing wrong), 401 otherwise.
    pub fn status_code(&self) -> StatusCode {
        match self {
            AuthError::JwksUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::MissingToken
            | AuthError::MalformedHeader
            | AuthError::InvalidToken(_)
            | AuthError::UnknownKey { .. } => StatusCode::UNAUTHORIZED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        assert_eq!(
            AuthError::JwksUnavailable("down".into()).status_code(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        for error in [
            AuthError::MissingToken,
            AuthError::MalformedHeader,
            AuthError::InvalidToken("expired".into()),
            AuthError::UnknownKey { kid: "k".into() },
        ] {
            assert_eq!(error.status_code(), StatusCode::UNAUTHORIZED, "{error}");
        }
    }
}
