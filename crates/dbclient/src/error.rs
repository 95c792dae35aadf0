//! The typed error every database operation returns.
//!
//! Hasura answers GraphQL errors with HTTP 200 and an `errors` array whose
//! `extensions.code` says what kind of failure it was; [`DbError::from_graphql_errors`] turns that
//! envelope into a variant a caller can match on. Because the status is 200 even when Hasura
//! cannot reach Postgres, a database outage is recognised by its code
//! ([`DbError::Unavailable`]), not by the HTTP status.

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
    /// The engine answered, but its database was unreachable or failed the query: Hasura's
    /// `postgres-error` (a lost connection, "connection error"), `postgres-max-connections-error`
    /// ("max connections reached on postgres") and `unexpected` "database query error". The
    /// same request may succeed once the database is back.
    #[error("{operation}: the GraphQL engine could not use the database ({code}): {message}")]
    Unavailable {
        operation: &'static str,
        code: String,
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
/// Hasura's message for a database failure it did not expect (code `unexpected`, from
/// `mkTxErrorHandler`); other `unexpected` errors are faults of the engine, not of the database.
const DATABASE_QUERY_ERROR: &str = "database query error";

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
            // Hasura cannot reach or use Postgres (its `FromPGConnErr` instance); the local engine
            // files every unclassified database error, a dropped pool included, under
            // `postgres-error` too.
            Some(code @ ("postgres-error" | "postgres-max-connections-error")) => {
                Self::Unavailable {
                    operation,
                    code: code.to_owned(),
                    message,
                }
            }
            Some(code @ "unexpected") if first.message.contains(DATABASE_QUERY_ERROR) => {
                Self::Unavailable {
                    operation,
                    code: code.to_owned(),
                    message,
                }
            }
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
            | Self::Unavailable { operation, .. }
            | Self::Graphql { operation, .. }
            | Self::Decode { operation, .. } => operation,
        }
    }

    /// Whether trying the same request again later may succeed (the engine, its database or the
    /// network was unavailable), as opposed to a request the database will refuse every time.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Unavailable { .. } => true,
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

    /// Hasura answers a database it cannot use with HTTP 200 and these envelopes. The messages
    /// and codes are hasura/graphql-engine's:
    /// - `server/src-lib/Hasura/Base/Error.hs`, `instance PG.FromPGConnErr QErr`:
    ///   `err500 PostgresMaxConnectionsError "max connections reached on postgres"` when libpq
    ///   says "too many clients", otherwise `err500 PostgresError "connection error"`; the codes'
    ///   spellings are its `instance ToJSON Code` (`PostgresError -> "postgres-error"`,
    ///   `PostgresMaxConnectionsError -> "postgres-max-connections-error"`,
    ///   `Unexpected -> "unexpected"`);
    /// - `server/src-lib/Hasura/Backends/Postgres/Execute/Types.hs`, `mkTxErrorHandler`: every
    ///   error `dmlTxErrorHandler` does not expect becomes
    ///   `internalError "database query error"` (`internalError = err500 Unexpected`);
    /// - the shape is `encodeGQLErr` (same file as the codes): `message`, and `extensions` with
    ///   `path` and `code`, plus `internal` for admin requests. `internal` of a connection error
    ///   is libpq's text, as logged in hasura/graphql-engine#6718 and #9658.
    #[test]
    fn hasura_database_outages_are_unavailable_and_transient() {
        let cases = [
            (
                serde_json::json!([{"message": "connection error", "extensions": {"path": "$", "code": "postgres-error"}}]),
                "postgres-error",
            ),
            (
                serde_json::json!([{"message": "connection error", "extensions": {
                    "path": "$", "code": "postgres-error",
                    "internal": "no connection to the server\n"
                }}]),
                "postgres-error",
            ),
            (
                serde_json::json!([{"message": "max connections reached on postgres", "extensions": {"path": "$", "code": "postgres-max-connections-error"}}]),
                "postgres-max-connections-error",
            ),
            (
                serde_json::json!([{"message": "database query error", "extensions": {"path": "$", "code": "unexpected"}}]),
                "unexpected",
            ),
            (
                serde_json::json!([{"message": "database query error", "extensions": {
                    "path": "$.selectionSet.update_whist_mandelboxes.args",
                    "code": "unexpected",
                    "internal": {"statement": "UPDATE ...", "prepared": true, "arguments": [],
                                 "error": {"status_code": "57P01", "exec_status": "FatalError",
                                           "message": "terminating connection due to administrator command",
                                           "description": null, "hint": null}}
                }}]),
                "unexpected",
            ),
        ];
        for (envelope, expected) in cases {
            let error = DbError::from_graphql_errors("Op", &errors(envelope));
            assert!(
                matches!(&error, DbError::Unavailable { code, .. } if code == expected),
                "{error:?}"
            );
            assert!(error.is_transient(), "{error:?}");
            assert_eq!(error.operation(), "Op");
        }
    }

    /// The local engine (postrust-server 3.1.0) files database errors it cannot classify, a
    /// pool that cannot reach Postgres included, as `postgres-error` with sqlx's message
    /// (postrust-graphql `src/hasura.rs`, `code_for`'s fallback; messages from sqlx-core's
    /// `Error`).
    #[test]
    fn the_local_engines_database_outages_are_transient() {
        for message in [
            "pool timed out while waiting for an open connection",
            "error communicating with database: Connection refused (os error 111)",
        ] {
            let envelope = serde_json::json!([{"message": message, "extensions": {
                "path": "$.selectionSet.whist_instances", "code": "postgres-error"
            }}]);
            let error = DbError::from_graphql_errors("Op", &errors(envelope));
            assert!(matches!(error, DbError::Unavailable { .. }), "{error:?}");
            assert!(error.is_transient());
        }
    }

    /// `unexpected` alone is a fault of the engine (Hasura's `throw500`, the local engine's
    /// schema that could not be built), which a retry does not mend; the fence and the
    /// triggers' refusals stay permanent whatever else the engine says.
    #[test]
    fn other_failures_stay_permanent() {
        for envelope in [
            serde_json::json!([{"message": "the GraphQL schema could not be built; see the server log", "extensions": {"path": "$", "code": "unexpected"}}]),
            serde_json::json!([{"message": "lease_lost: replica-a does not hold lease scaling in generation 3", "extensions": {"path": "$", "code": "postgres-error"}}]),
            serde_json::json!([{"message": "Check constraint violation. instance_full: instance i-1 has no remaining capacity", "extensions": {"path": "$", "code": "permission-error"}}]),
        ] {
            let error = DbError::from_graphql_errors("Op", &errors(envelope));
            assert!(!error.is_transient(), "{error:?}");
            assert!(!matches!(error, DbError::Unavailable { .. }), "{error:?}");
        }
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
