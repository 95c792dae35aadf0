//! Cross-origin access for the browser clients that call the public routes directly: any
//! origin, the given methods, the headers those clients send. tower-http's `CorsLayer` answers
//! every `OPTIONS` itself; the contract clients were written against answers it with 204, so
//! the preflight's status is 204 here.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{Any, CorsLayer};

/// `router` answering CORS preflights and marking every response as readable by any origin.
pub fn cors(router: Router, methods: &[Method]) -> Router {
    let layer = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(methods.to_vec())
        .allow_headers([
            header::ORIGIN,
            header::ACCEPT,
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("x-requested-with"),
        ]);
    router
        .layer(layer)
        .layer(axum::middleware::from_fn(preflight_answers_no_content))
}

async fn preflight_answers_no_content(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let mut response = next.run(request).await;
    if preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::put;
    use tower::ServiceExt;

    fn app() -> Router {
        cors(
            Router::new().route("/x", put(|| async { "done" })),
            &[Method::PUT, Method::OPTIONS],
        )
    }

    #[tokio::test]
    async fn a_preflight_gets_204_with_the_allowed_methods_and_headers() {
        let request = Request::builder()
            .method(Method::OPTIONS)
            .uri("/x")
            .header(header::ORIGIN, "chrome-extension://abc")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "PUT")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization")
            .body(Body::empty())
            .expect("request");
        let response = app().oneshot(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let headers = response.headers();
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_METHODS], "PUT,OPTIONS");
        let allowed = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .expect("text");
        assert!(allowed.contains("authorization"), "{allowed}");
    }

    #[tokio::test]
    async fn a_plain_request_is_readable_from_any_origin() {
        let request = Request::builder()
            .method(Method::PUT)
            .uri("/x")
            .header(header::ORIGIN, "https://example.test")
            .body(Body::empty())
            .expect("request");
        let response = app().oneshot(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }
}
