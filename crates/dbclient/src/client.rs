//! The HTTP side of the Hasura client: one POST per operation.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use crate::error::GraphqlError;
use crate::{DbError, Operation};

/// Header that authenticates as the engine's admin.
pub(crate) const ADMIN_SECRET_HEADER: &str = "x-hasura-admin-secret";

/// Where the GraphQL engine is and how to talk to it.
#[derive(Clone)]
pub struct HasuraConfig {
    /// The HTTP endpoint, e.g. `https://hasura.example.com/v1/graphql`.
    pub url: Url,
    /// The websocket endpoint for live queries. `None` derives it from `url` (`http` → `ws`,
    /// `https` → `wss`, same path), which is right for Hasura.
    pub websocket_url: Option<Url>,
    /// Sent as `x-hasura-admin-secret` on every request and in the websocket's init payload.
    pub admin_secret: Option<String>,
    /// Upper bound for one HTTP request, connection included.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for HasuraConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HasuraConfig")
            .field("url", &self.url.as_str())
            .field(
                "websocket_url",
                &self.websocket_url.as_ref().map(Url::as_str),
            )
            .field(
                "admin_secret",
                &self.admin_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl HasuraConfig {
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(url: Url, admin_secret: Option<String>) -> Self {
        Self {
            url,
            websocket_url: None,
            admin_secret,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The websocket URL live queries connect to.
    pub fn websocket_url(&self) -> Url {
        if let Some(url) = &self.websocket_url {
            return url.clone();
        }
        let mut url = self.url.clone();
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .expect("http(s) and ws(s) URLs are interchangeable");
        url
    }
}

/// A cheap-to-clone handle to the GraphQL engine.
#[derive(Debug, Clone)]
pub struct HasuraClient {
    http: reqwest::Client,
    config: std::sync::Arc<HasuraConfig>,
    /// Answers every call in process instead of the engine (tests only).
    #[cfg(any(test, feature = "fake"))]
    pub(crate) fake: Option<std::sync::Arc<crate::fake::FakeDatabase>>,
}

/// The GraphQL response envelope.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    errors: Option<Vec<GraphqlError>>,
}

impl HasuraClient {
    pub fn new(config: HasuraConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64)
            .build()
            .expect("a client with only timeouts and pool settings always builds");
        Self {
            http,
            config: std::sync::Arc::new(config),
            #[cfg(any(test, feature = "fake"))]
            fake: None,
        }
    }

    /// This client, answered by `fake` instead of the engine.
    #[cfg(any(test, feature = "fake"))]
    pub(crate) fn with_fake(mut self, fake: std::sync::Arc<crate::fake::FakeDatabase>) -> Self {
        self.fake = Some(fake);
        self
    }

    pub fn config(&self) -> &HasuraConfig {
        &self.config
    }

    /// Sends one operation and decodes its answer.
    #[tracing::instrument(level = "debug", skip_all, fields(operation = operation.name()))]
    pub async fn execute<T>(&self, operation: &Operation<T>) -> Result<T, DbError> {
        let name = operation.name();
        #[cfg(any(test, feature = "fake"))]
        if let Some(fake) = &self.fake {
            let (status, body) = fake.answer(name, operation.variables()).await;
            return decode_response(operation, status, &body);
        }
        let mut request = self
            .http
            .post(self.config.url.clone())
            .json(&operation.request_body());
        if let Some(secret) = &self.config.admin_secret {
            request = request.header(ADMIN_SECRET_HEADER, secret);
        }
        let response = request.send().await.map_err(|source| DbError::Transport {
            operation: name,
            source,
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|source| DbError::Transport {
                operation: name,
                source,
            })?;
        decode_response(operation, status.as_u16(), &body)
    }
}

/// Turns an HTTP answer into the operation's result or a typed error.
pub(crate) fn decode_response<T>(
    operation: &Operation<T>,
    status: u16,
    body: &[u8],
) -> Result<T, DbError> {
    let name = operation.name();
    let envelope = serde_json::from_slice::<Envelope>(body);
    // Hasura answers GraphQL errors with 200, but some proxies and engines use 4xx with the same
    // envelope; prefer the envelope's classification whenever there is one.
    if let Ok(Envelope {
        errors: Some(errors),
        ..
    }) = &envelope
        && !errors.is_empty()
    {
        return Err(DbError::from_graphql_errors(name, errors));
    }
    if !(200..300).contains(&status) {
        return Err(DbError::HttpStatus {
            operation: name,
            status,
            body: excerpt(body),
        });
    }
    match envelope {
        Ok(Envelope {
            data: Some(data), ..
        }) if !data.is_null() => operation.decode(data),
        Ok(_) => Err(DbError::Decode {
            operation: name,
            message: "answer has no data".to_owned(),
        }),
        Err(error) => Err(DbError::Decode {
            operation: name,
            message: format!(
                "answer is not a GraphQL response ({error}): {}",
                excerpt(body)
            ),
        }),
    }
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    const LIMIT: usize = 300;
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::operation::field;

    fn operation() -> Operation<Vec<i32>> {
        Operation::new(
            "Things",
            "query Things { things }",
            json!({}),
            field("things"),
        )
    }

    #[test]
    fn websocket_url_follows_the_http_scheme_unless_given() {
        let mut config = HasuraConfig::new(
            "https://db.example.com/v1/graphql".parse().expect("url"),
            None,
        );
        assert_eq!(
            config.websocket_url().as_str(),
            "wss://db.example.com/v1/graphql"
        );
        config.url = "http://127.0.0.1:8080/v1/graphql".parse().expect("url");
        assert_eq!(
            config.websocket_url().as_str(),
            "ws://127.0.0.1:8080/v1/graphql"
        );
        config.websocket_url = Some("ws://127.0.0.1:9/v1/graphql/ws".parse().expect("url"));
        assert_eq!(
            config.websocket_url().as_str(),
            "ws://127.0.0.1:9/v1/graphql/ws"
        );
    }

    #[test]
    fn the_admin_secret_never_shows_in_debug_output() {
        let config = HasuraConfig::new(
            "http://127.0.0.1/".parse().expect("url"),
            Some("hunter2".into()),
        );
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn malformed_answers_are_typed_errors() {
        let cases: [(u16, &[u8], &str); 6] = [
            (200, b"<html>oops</html>", "Decode"),
            (200, b"{}", "Decode"),
            (200, b"{\"data\": null}", "Decode"),
            (200, b"{\"data\": {\"things\": \"no\"}}", "Decode"),
            (502, b"bad gateway", "HttpStatus"),
            (200, b"{\"errors\": []}", "Decode"),
        ];
        for (status, body, variant) in cases {
            let error = decode_response(&operation(), status, body).expect_err("must fail");
            assert!(
                format!("{error:?}").starts_with(variant),
                "{body:?}: {error:?}"
            );
        }
    }

    #[test]
    fn an_error_envelope_wins_over_the_status() {
        let body = br#"{"errors":[{"message":"no","extensions":{"code":"access-denied"}}]}"#;
        let error = decode_response(&operation(), 400, body).expect_err("must fail");
        assert!(matches!(error, DbError::AccessDenied { .. }), "{error:?}");
    }

    /// Hasura answers `/v1/graphql` with HTTP 200 even when it cannot use Postgres; the body's
    /// code, not the status, makes these transient. Bodies as hasura/graphql-engine builds them:
    /// `server/src-lib/Hasura/Base/Error.hs` (`instance PG.FromPGConnErr QErr`, `encodeGQLErr`)
    /// and `server/src-lib/Hasura/Backends/Postgres/Execute/Types.hs` (`mkTxErrorHandler`),
    /// next to the local engine's (postrust-graphql `code_for`: unclassified database errors are
    /// `postgres-error`).
    #[test]
    fn database_outages_answered_with_200_are_transient() {
        let bodies: [&[u8]; 5] = [
            br#"{"errors":[{"message":"connection error","extensions":{"path":"$","code":"postgres-error"}}]}"#,
            br#"{"errors":[{"message":"connection error","extensions":{"path":"$","code":"postgres-error","internal":"server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally\n\tbefore or while processing the request.\n"}}]}"#,
            br#"{"errors":[{"message":"max connections reached on postgres","extensions":{"path":"$","code":"postgres-max-connections-error"}}]}"#,
            br#"{"errors":[{"message":"database query error","extensions":{"path":"$","code":"unexpected"}}]}"#,
            br#"{"errors":[{"message":"pool timed out while waiting for an open connection","extensions":{"path":"$.selectionSet.things","code":"postgres-error"}}]}"#,
        ];
        for body in bodies {
            let error = decode_response(&operation(), 200, body).expect_err("must fail");
            assert!(matches!(error, DbError::Unavailable { .. }), "{error:?}");
            assert!(error.is_transient(), "{error:?}");
        }
        // Other errors in a 200 stay permanent.
        let body = br#"{"errors":[{"message":"field 'nope' not found in type: 'query_root'","extensions":{"path":"$.selectionSet.nope","code":"validation-failed"}}]}"#;
        let error = decode_response(&operation(), 200, body).expect_err("must fail");
        assert!(!error.is_transient(), "{error:?}");
    }

    #[test]
    fn a_good_answer_decodes() {
        let body = br#"{"data":{"things":[1,2,3]}}"#;
        assert_eq!(
            decode_response(&operation(), 200, body).expect("ok"),
            vec![1, 2, 3]
        );
    }
}
