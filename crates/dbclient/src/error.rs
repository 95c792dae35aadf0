//! The typed error every database operation returns.
//!
//! Hasura answers GraphQL errors with HTTP 200 and an `errors` array whose
//! `extensions.code` says what kind of failure it was; [`DbError::from_graphql_errors`] turns that
//! envelope into a variant a caller can match on.

use serde::Deserialize;

/// Why a database operation failed. Every variant names the operation.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The request never got an answer (connection refused, timeout, TLS).
    #[error("{operation}: request to the GraphQL engine failed: {source}")]
    Transport {
        operation: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// The engine answered with a non-success HTTP status.
    #[error("{operation}: GraphQL engine answered HTTP {status}: {body}")]
    HttpStatus {
        operation: &'static str,
        status: u16,
        body: String,
    },
    /// A database constraint or trigger refused the write; the whole mutation rolled back.
    #[error("{operation}: constraint violation: {message}")]
    ConstraintViolation {
        operation: &'static str,
        message: String,
    },
    /// A leader's write was refused because its lease moved on (`lease_lost`): another replica
    /// leads now, and nothing of the write landed.
    #[error("{operation}: refused, the leader lease was lost: {message}")]
    Fenced {
        operation: &'static str,
        message: String,
    },
    /// The engine rejected the document or its variables.
    #[error("{operation}: request rejected as invalid: {message}")]
    Validation {
        operation: &'static str,
        message: String,
    },
    /// The credentials were missing or not allowed to do this.
    #[error("{operation}: access denied: {message}")]
    AccessDenied {
        operation: &'static str,
        message: String,
    },
    /// Any other GraphQL error the engine reported.
    #[error("{operation}: GraphQL error ({code}): {message}")]
    Graphql {
        operation: &'static str,
        code: String,
        message: String,
    },
    /// The answer did not have the shape the operation expects.
    #[error("{operation}: unexpected answer from the GraphQL engine: {message}")]
    Decode {
        operation: &'static str,
        message: String,
    },
}

/// One entry of a GraphQL `errors` array.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct GraphqlError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub extensions: Option<GraphqlErrorExtensions>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct GraphqlErrorExtensions {
    #[serde(default)]
    pub code: Option<String>,
}

/// The tag the lease fence's refusal starts with (see the fleet-safety migration).
const FENCE_TAG: &str = "lease_lost";
/// How Hasura prefixes the message of a CHECK violation.
const CHECK_VIOLATION_PREFIX: &str = "Check constraint violation.";

impl DbError {
    /// Classifies a non-empty `errors` array by its first entry's `extensions.code`.
    pub(crate) fn from_graphql_errors(operation: &'static str, errors: &[GraphqlError]) -> Self {
        let Some(first) = errors.first() else {
            return Self::Decode {
                operation,
                message: "empty errors array".to_owned(),
            };
        };
        let message = errors
            .iter()
            .map(|error| error.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let code = first
            .extensions
            .as_ref()
            .and_then(|extensions| extensions.code.clone());
        // The fence's refusal is told apart by its tag, whatever code the engine files it under.
        if message.contains(FENCE_TAG) {
            return Self::Fenced { operation, message };
        }
        match code.as_deref() {
            Some("constraint-violation") => Self::ConstraintViolation { operation, message },
            // Hasura files CHECK violations (SQLSTATE 23514, which the triggers raise) as
            // permission errors with this prefix (its `mkTxErrorHandler`); the local engine
            // calls them constraint violations.
            Some("permission-error") if message.contains(CHECK_VIOLATION_PREFIX) => {
                Self::ConstraintViolation { operation, message }
            }
            Some(
                "validation-failed" | "parse-failed" | "bad-request" | "invalid-params"
                | "not-supported" | "data-exception",
            ) => Self::Validation { operation, message },
            Some(
                "access-denied" | "permission-denied" | "invalid-jwt" | "invalid-headers"
                | "jwt-invalid-claims",
            ) => Self::AccessDenied { operation, message },
            other => Self::Graphql {
                operation,
                code: other.unwrap_or("unknown").to_owned(),
                message,
            },
        }
    }

    /// The operation that failed.
    pub fn operation(&self) -> &'static str {
        match self {
            Self::Transport { operation, .. }
            | Self::HttpStatus { operation, .. }
            | Self::ConstraintViolation { operation, .. }
            | Self::Fenced { operation, .. }
            | Self::Validation { operation, .. }
            | Self::AccessDenied { operation, .. }
            | Self::Graphql { operation, .. }
            | Self::Decode { operation, .. } => operation,
        }
    }

    /// Whether trying the same request again later may succeed (the engine or the network was
    /// unavailable), as opposed to a request the database will refuse every time.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(json: serde_json::Value) -> Vec<GraphqlError> {
        serde_json::from_value(json).expect("errors array")
    }

    #[test]
    fn codes_map_to_variants() {
        let cases = [
            ("constraint-violation", "ConstraintViolation"),
            ("validation-failed", "Validation"),
            ("access-denied", "AccessDenied"),
            ("invalid-jwt", "AccessDenied"),
            ("unexpected", "Graphql"),
        ];
        for (code, variant) in cases {
            let error = DbError::from_graphql_errors(
                "Op",
                &errors(serde_json::json!([{"message": "m", "extensions": {"code": code}}])),
            );
            assert!(
                format!("{error:?}").starts_with(variant),
                "{code} gave {error:?}"
            );
            assert_eq!(error.operation(), "Op");
        }
    }

    /// The fence's refusal as both engines report it: the local engine's `constraint-violation`,
    /// and Hasura's `permission-error` with its check-violation prefix.
    #[test]
    fn a_lost_lease_is_fenced_on_either_engine() {
        let message = "lease_lost: replica-a does not hold lease scaling in generation 3";
        for envelope in [
            serde_json::json!([{"message": message, "extensions": {"code": "constraint-violation", "path": "$"}}]),
            serde_json::json!([{"message": format!("Check constraint violation. {message}"), "extensions": {"code": "permission-error", "path": "$"}}]),
        ] {
            let error = DbError::from_graphql_errors("Op", &errors(envelope));
            assert!(matches!(error, DbError::Fenced { .. }), "{error:?}");
            assert!(!error.is_transient());
        }
    }

    /// Hasura reports the triggers' refusals (SQLSTATE 23514) as `permission-error` with this
    /// prefix; they are the same constraint violations the local engine reports.
    #[test]
    fn hasura_check_violations_are_constraint_violations() {
        let envelope = serde_json::json!([{
            "message": "Check constraint violation. instance_not_accepting: instance i-1 is DRAINING",
            "extensions": {"code": "permission-error", "path": "$.selectionSet.update_whist_mandelboxes.args"}
        }]);
        let error = DbError::from_graphql_errors("Op", &errors(envelope));
        assert!(
            matches!(&error, DbError::ConstraintViolation { message, .. } if message.contains("instance_not_accepting")),
            "{error:?}"
        );
        // A real permission problem stays one.
        let envelope = serde_json::json!([{"message": "field not found", "extensions": {"code": "permission-error"}}]);
        assert!(matches!(
            DbError::from_graphql_errors("Op", &errors(envelope)),
            DbError::Graphql { .. }
        ));
    }

    #[test]
    fn missing_extensions_is_still_an_error_with_the_message() {
        let error =
            DbError::from_graphql_errors("Op", &errors(serde_json::json!([{"message": "boom"}])));
        match error {
            DbError::Graphql { code, message, .. } => {
                assert_eq!(code, "unknown");
                assert_eq!(message, "boom");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn only_unavailability_is_transient() {
        let status = |status| DbError::HttpStatus {
            operation: "Op",
            status,
            body: String::new(),
        };
        assert!(status(503).is_transient());
        assert!(!status(400).is_transient());
        assert!(
            !DbError::ConstraintViolation {
                operation: "Op",
                message: String::new()
            }
            .is_transient()
        );
    }
}
