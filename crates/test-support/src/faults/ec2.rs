//! The EC2 API proxy: forwards to moto, counts calls per action, and misbehaves on demand.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, request};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use super::xml::hide_instances;
use super::{lock, spawn_server, stop_server};

/// The EC2 API namespace real EC2 puts on its responses (moto writes it without the trailing
/// slash; the SDK ignores it either way).
const EC2_XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// The largest request body the EC2 proxy reads; EC2 Query bodies are a few kilobytes.
const MAX_REQUEST_BODY: usize = 16 * 1024 * 1024;

/// The error a throttling [`FaultMode`] answers with. Both are HTTP 503 with EC2's XML error
/// envelope, as real EC2 sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleError {
    /// Code `RequestLimitExceeded`: the API rate limit, which the SDK classifies as throttling.
    RequestLimitExceeded,
    /// Code `Unavailable`: the service is overloaded, a transient server error to the SDK.
    ServiceUnavailable,
}

impl ThrottleError {
    /// The EC2 error code.
    pub fn code(self) -> &'static str {
        match self {
            Self::RequestLimitExceeded => "RequestLimitExceeded",
            Self::ServiceUnavailable => "Unavailable",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::RequestLimitExceeded => "Request limit exceeded.",
            Self::ServiceUnavailable => "The server is overloaded and can't handle the request.",
        }
    }
}

/// What [`Ec2FaultProxy`] does with the requests it receives. The mode is read once when a
/// request arrives: a switch applies to the requests that arrive after it.
///
/// Requests that name no `Action` (moto's own `/moto-api/...` endpoints, say) are always
/// forwarded unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// Forward everything and relay the answers unchanged.
    #[default]
    PassThrough,
    /// Answer the named actions (all actions when `None`) with `error` without forwarding them.
    Throttle {
        actions: Option<Vec<String>>,
        error: ThrottleError,
    },
    /// Answer every DescribeInstances with a valid, empty response without forwarding it (the
    /// view of an EC2 that has not caught up yet); forward every other action.
    EmptyDescribe,
    /// Forward DescribeInstances but remove these instance ids from the answer, dropping a
    /// reservation whose instances are all removed; forward every other action unchanged.
    HideInstances(Vec<String>),
    /// Forward the named actions after sleeping `delay`; the others at once.
    DelayActions {
        actions: Vec<String>,
        delay: Duration,
    },
}

/// An HTTP reverse proxy on a loopback port in front of an EC2 API endpoint (moto), which
/// counts the requests per `Action` and injects the faults of its [`FaultMode`].
///
/// Point the SDK's `endpoint_url` at [`Ec2FaultProxy::endpoint`] instead of moto's. Every
/// request is counted when it arrives, whether it is then forwarded or answered by a fault, so
/// a test can assert how often a throttled call was retried.
pub struct Ec2FaultProxy {
    addr: SocketAddr,
    shared: Arc<Ec2Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct Ec2Shared {
    /// The upstream's base URL without a trailing slash; the request's path is appended.
    upstream: String,
    client: reqwest::Client,
    mode: Mutex<FaultMode>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_action: HashMap<String, usize>,
    total: usize,
}

impl Ec2FaultProxy {
    /// Starts the proxy in [`FaultMode::PassThrough`] on a free loopback port, forwarding to
    /// `upstream` (`http://127.0.0.1:PORT`, as [`crate::Moto::endpoint`] returns). Refuses an
    /// upstream that is not plain HTTP on a loopback address.
    pub fn start(upstream: &str) -> anyhow::Result<Self> {
        let url = url::Url::parse(upstream).with_context(|| format!("parse {upstream:?}"))?;
        if url.scheme() != "http" || !is_loopback(&url) {
            bail!(
                "the EC2 fault proxy only forwards to http on a loopback address, not {upstream}"
            );
        }
        // No proxy from the environment (HTTP_PROXY would take the traffic off loopback), and
        // redirects relayed to the client rather than followed here.
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .context("build the proxy's HTTP client")?;
        let shared = Arc::new(Ec2Shared {
            upstream: url.as_str().trim_end_matches('/').to_owned(),
            client,
            mode: Mutex::new(FaultMode::PassThrough),
            counts: Mutex::new(Counts::default()),
        });
        let app = Router::new()
            .fallback(handle_ec2)
            .with_state(Arc::clone(&shared));
        let (addr, shutdown, thread) =
            spawn_server("whist-ec2-fault-proxy", move |listener, stop| async move {
                tokio::select! {
                    // `serve` only returns on an accept error it cannot recover from.
                    _ = axum::serve(listener, app) => {}
                    _ = stop => {}
                }
            })?;
        Ok(Self {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, for the SDK's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The loopback address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream the proxy forwards to, as given to [`Ec2FaultProxy::start`] (without a
    /// trailing slash).
    pub fn upstream(&self) -> &str {
        &self.shared.upstream
    }

    /// Switches the mode for the requests that arrive from now on.
    pub fn set_mode(&self, mode: FaultMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        lock(&self.shared.mode).clone()
    }

    /// How many requests naming `action` (e.g. `"DescribeInstances"`) have arrived since the
    /// start or the last [`Ec2FaultProxy::reset_counts`], forwarded or not.
    pub fn calls(&self, action: &str) -> usize {
        lock(&self.shared.counts)
            .by_action
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// How many requests have arrived, whatever their action (requests naming none included).
    pub fn total_calls(&self) -> usize {
        lock(&self.shared.counts).total
    }

    /// Forgets the counts.
    pub fn reset_counts(&self) {
        *lock(&self.shared.counts) = Counts::default();
    }
}

impl fmt::Debug for Ec2FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl Drop for Ec2FaultProxy {
    fn drop(&mut self) {
        stop_server(self.shutdown.take(), self.thread.take());
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Every request: count it, then fault or forward it according to the mode at its arrival.
async fn handle_ec2(State(shared): State<Arc<Ec2Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
        Ok(body) => body,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("read the request: {error}"),
            )
                .into_response();
        }
    };
    let action = action_of(parts.uri.query(), &body);
    {
        let mut counts = lock(&shared.counts);
        counts.total += 1;
        if let Some(action) = &action {
            *counts.by_action.entry(action.clone()).or_default() += 1;
        }
    }
    let Some(action) = action else {
        return forward(&shared, &parts, body).await;
    };
    let mode = lock(&shared.mode).clone();
    match mode {
        FaultMode::PassThrough => forward(&shared, &parts, body).await,
        FaultMode::Throttle { actions, error } => {
            if actions.is_none_or(|actions| actions.contains(&action)) {
                ec2_error(error)
            } else {
                forward(&shared, &parts, body).await
            }
        }
        FaultMode::EmptyDescribe if action == "DescribeInstances" => empty_describe(),
        FaultMode::EmptyDescribe => forward(&shared, &parts, body).await,
        FaultMode::HideInstances(hidden) if action == "DescribeInstances" => {
            let mut parts = parts;
            // The filter edits the body as text: ask for it uncompressed.
            parts.headers.remove(header::ACCEPT_ENCODING);
            let response = forward(&shared, &parts, body).await;
            filter_describe(response, &hidden).await
        }
        FaultMode::HideInstances(_) => forward(&shared, &parts, body).await,
        FaultMode::DelayActions { actions, delay } => {
            if actions.contains(&action) {
                tokio::time::sleep(delay).await;
            }
            forward(&shared, &parts, body).await
        }
    }
}

/// The `Action` of an EC2 Query request: from the query string (GET style) or the form body
/// (what the SDK sends).
fn action_of(query: Option<&str>, body: &[u8]) -> Option<String> {
    let find = |input: &[u8]| {
        url::form_urlencoded::parse(input)
            .find(|(key, _)| key == "Action")
            .map(|(_, value)| value.into_owned())
    };
    query
        .and_then(|query| find(query.as_bytes()))
        .or_else(|| find(body))
}

/// Headers that describe one hop rather than the message (RFC 9110 §7.6.1), plus the ones the
/// proxy sets itself: `host` (the upstream's) and `content-length` (the body's, which the
/// response filter may change).
fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    const HOP_BY_HOP: [&str; 11] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ];
    HOP_BY_HOP.contains(&name.as_str()) || listed.iter().any(|listed| listed == name.as_str())
}

/// The end-to-end headers of `headers`: without the hop-by-hop ones, including those the
/// `Connection` header names.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name, &listed))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Sends the request to the upstream and relays its answer (502 when it cannot be reached, as
/// a load balancer in front of a dead backend would).
async fn forward(shared: &Ec2Shared, parts: &request::Parts, body: Bytes) -> Response {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path_and_query| path_and_query.as_str());
    let url = format!("{}{path}", shared.upstream);
    let sent = shared
        .client
        .request(parts.method.clone(), url)
        .headers(end_to_end(&parts.headers))
        .body(body)
        .send()
        .await;
    let upstream = match sent {
        Ok(upstream) => upstream,
        Err(error) => return bad_gateway(format!("forward to the upstream: {error}")),
    };
    let status = upstream.status();
    let headers = end_to_end(upstream.headers());
    let body = match upstream.bytes().await {
        Ok(body) => body,
        Err(error) => return bad_gateway(format!("read the upstream's answer: {error}")),
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn bad_gateway(message: String) -> Response {
    (StatusCode::BAD_GATEWAY, message).into_response()
}

/// A request id shaped like EC2's (a UUID), unique within the process.
fn request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (nanos >> 32) as u32,
        (nanos >> 16) as u16,
        std::process::id() & 0xfff,
        count & 0xfff,
        ((nanos as u64 & 0xffff_ffff) << 16) | (count & 0xffff)
    )
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/xml;charset=UTF-8"),
        )],
        body,
    )
        .into_response()
}

/// EC2's error envelope (the `Response`/`Errors` document its Query API returns).
fn ec2_error(error: ThrottleError) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        error.code(),
        error.message(),
        request_id()
    );
    xml_response(StatusCode::SERVICE_UNAVAILABLE, body)
}

/// A valid DescribeInstances answer with no reservations.
fn empty_describe() -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse xmlns=\"{EC2_XMLNS}\">\
         <requestId>{}</requestId><reservationSet/></DescribeInstancesResponse>",
        request_id()
    );
    xml_response(StatusCode::OK, body)
}

/// Removes the hidden instances from a successful DescribeInstances answer; an error answer is
/// relayed as it is. An answer the filter cannot read is turned into a 502 naming why, so a
/// change in moto's output fails the test loudly instead of hiding nothing.
async fn filter_describe(response: Response, hidden: &[String]) -> Response {
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    if parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|encoding| encoding != "identity")
    {
        return bad_gateway("HideInstances cannot edit a compressed answer".to_owned());
    }
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(error) => return bad_gateway(format!("read the upstream's answer: {error}")),
    };
    let filtered = std::str::from_utf8(&body)
        .map_err(|error| format!("the answer is not UTF-8: {error}"))
        .and_then(|xml| hide_instances(xml, hidden));
    match filtered {
        Ok(xml) => Response::from_parts(parts, Body::from(xml)),
        Err(error) => bad_gateway(format!("HideInstances could not edit the answer: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use tokio::net::TcpStream;

    use super::super::xml::texts;
    use crate::moto::shared_moto;

    /// moto routes by the credential scope of a SigV4 `Authorization` header; without one a
    /// `POST /` is taken for S3 (it answers `ListAllMyBucketsResult`). It checks no signature.
    const EC2_AUTH: &str = "AWS4-HMAC-SHA256 \
        Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0";

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("reqwest client")
    }

    /// POSTs an EC2 Query form body; the status, the headers and the body.
    async fn ec2(endpoint: &str, params: &[(&str, &str)]) -> (u16, HeaderMap, String) {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("Version", "2016-11-15");
        for (key, value) in params {
            form.append_pair(key, value);
        }
        let response = client()
            .post(format!("{endpoint}/"))
            .header(header::AUTHORIZATION, EC2_AUTH)
            .header(
                header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(form.finish())
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.expect("body"))
    }

    /// Launches `count` instances in one reservation through `endpoint`, tagged `tag`; their ids
    /// and the reservation id.
    async fn run_instances(endpoint: &str, count: usize, tag: &str) -> (Vec<String>, String) {
        let count = count.to_string();
        let (status, _, body) = ec2(
            endpoint,
            &[
                ("Action", "RunInstances"),
                ("ImageId", "ami-12345678"),
                ("MinCount", &count),
                ("MaxCount", &count),
                ("InstanceType", "t2.micro"),
                ("TagSpecification.1.ResourceType", "instance"),
                ("TagSpecification.1.Tag.1.Key", "fault-test"),
                ("TagSpecification.1.Tag.1.Value", tag),
            ],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let reservation = texts(&body, "reservationId").remove(0);
        (texts(&body, "instanceId"), reservation)
    }

    /// DescribeInstances for the instances tagged `tag`.
    async fn describe_tagged(endpoint: &str, tag: &str) -> (u16, HeaderMap, String) {
        ec2(
            endpoint,
            &[
                ("Action", "DescribeInstances"),
                ("Filter.1.Name", "tag:fault-test"),
                ("Filter.1.Value.1", tag),
            ],
        )
        .await
    }

    #[test]
    fn fault_actions_are_read_from_the_query_or_the_form_body() {
        assert_eq!(
            action_of(
                None,
                b"Version=2016-11-15&Action=DescribeInstances&MaxResults=5"
            )
            .as_deref(),
            Some("DescribeInstances")
        );
        assert_eq!(
            action_of(Some("Action=RunInstances&Version=1"), b"").as_deref(),
            Some("RunInstances")
        );
        assert_eq!(action_of(Some("x=1"), b"{\"json\": true}"), None);
        assert_eq!(
            action_of(None, b"Action=Describe%49nstances").as_deref(),
            Some("DescribeInstances"),
            "percent-decoded"
        );
    }

    #[test]
    fn fault_hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("AWS4 x"));
        headers.insert("x-amz-date", HeaderValue::from_static("20260101T000000Z"));
        let kept = end_to_end(&headers);
        let mut names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "x-amz-date"]);
    }

    #[test]
    fn fault_proxy_refuses_non_loopback_upstreams() {
        for upstream in [
            "http://10.0.0.1:5000",
            "https://127.0.0.1:5000",
            "http://ec2.us-east-1.amazonaws.com",
        ] {
            assert!(Ec2FaultProxy::start(upstream).is_err(), "{upstream}");
        }
        let upstream = SocketAddr::from(([10, 0, 0, 1], 5000));
        assert!(super::super::CuttableProxy::start(upstream).is_err());
    }

    #[tokio::test]
    async fn fault_pass_through_relays_and_counts() {
        let moto = shared_moto();
        let proxy = Ec2FaultProxy::start(&moto.endpoint()).expect("proxy");
        assert_eq!(proxy.mode(), FaultMode::PassThrough);
        let tag = crate::unique("pass");

        let (ids, _) = run_instances(&proxy.endpoint(), 1, &tag).await;
        let (status, headers, through) = describe_tagged(&proxy.endpoint(), &tag).await;
        assert_eq!(status, 200);
        assert_eq!(texts(&through, "instanceId"), ids);
        // The same bytes as moto's own answer (moto's requestId is the constant "request-id").
        let (_, direct_headers, direct) = describe_tagged(&moto.endpoint(), &tag).await;
        assert_eq!(through, direct);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            direct_headers[header::CONTENT_TYPE]
        );
        // moto closes every connection ("Connection: close"); that is its hop, not the client's.
        assert_eq!(direct_headers[header::CONNECTION], "close");
        assert!(!headers.contains_key(header::CONNECTION));

        // Error answers are relayed too, status and all.
        let (status, _, error) = ec2(
            &proxy.endpoint(),
            &[
                ("Action", "DescribeInstances"),
                ("InstanceId.1", "i-00000000000000000"),
            ],
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(texts(&error, "Code"), ["InvalidInstanceID.NotFound"]);

        // A request without an Action reaches moto too and counts only in the total.
        let moto_api = client()
            .get(format!("{}/moto-api/", proxy.endpoint()))
            .send()
            .await
            .expect("moto api");
        assert_eq!(moto_api.status(), 200);

        assert_eq!(proxy.calls("RunInstances"), 1);
        assert_eq!(proxy.calls("DescribeInstances"), 2);
        assert_eq!(proxy.calls("TerminateInstances"), 0);
        assert_eq!(proxy.total_calls(), 4);
        proxy.reset_counts();
        assert_eq!(proxy.calls("DescribeInstances"), 0);
        assert_eq!(proxy.total_calls(), 0);
    }

    #[tokio::test]
    async fn fault_throttle_answers_like_ec2_without_forwarding() {
        let moto = shared_moto();
        let proxy = Ec2FaultProxy::start(&moto.endpoint()).expect("proxy");
        let tag = crate::unique("throttle");

        proxy.set_mode(FaultMode::Throttle {
            actions: Some(vec!["RunInstances".to_owned()]),
            error: ThrottleError::RequestLimitExceeded,
        });
        let launch = [
            ("Action", "RunInstances"),
            ("ImageId", "ami-12345678"),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", "fault-test"),
            ("TagSpecification.1.Tag.1.Value", tag.as_str()),
        ];
        for _ in 0..3 {
            let (status, headers, body) = ec2(&proxy.endpoint(), &launch).await;
            assert_eq!(status, 503);
            assert!(
                headers[header::CONTENT_TYPE]
                    .to_str()
                    .expect("ascii")
                    .starts_with("text/xml")
            );
            assert!(body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));
            assert_eq!(texts(&body, "Code"), ["RequestLimitExceeded"]);
            assert_eq!(texts(&body, "Message"), ["Request limit exceeded."]);
            assert_eq!(texts(&body, "RequestID")[0].len(), 36, "a UUID-shaped id");
        }
        // Not throttled: DescribeInstances goes through, and shows nothing was launched.
        let (status, _, body) = describe_tagged(&proxy.endpoint(), &tag).await;
        assert_eq!(status, 200, "{body}");
        assert!(texts(&body, "instanceId").is_empty(), "{body}");
        assert_eq!(proxy.calls("RunInstances"), 3, "throttled calls count");

        proxy.set_mode(FaultMode::Throttle {
            actions: None,
            error: ThrottleError::ServiceUnavailable,
        });
        for action in ["DescribeInstances", "TerminateInstances", "DescribeRegions"] {
            let (status, _, body) = ec2(&proxy.endpoint(), &[("Action", action)]).await;
            assert_eq!(status, 503, "{action}");
            assert_eq!(texts(&body, "Code"), ["Unavailable"]);
        }
        let first = texts(
            &ec2(&proxy.endpoint(), &[("Action", "X")]).await.2,
            "RequestID",
        );
        let second = texts(
            &ec2(&proxy.endpoint(), &[("Action", "X")]).await.2,
            "RequestID",
        );
        assert_ne!(first, second, "every answer has its own request id");

        proxy.set_mode(FaultMode::PassThrough);
        let (ids, _) = run_instances(&proxy.endpoint(), 1, &tag).await;
        let (_, _, body) = describe_tagged(&moto.endpoint(), &tag).await;
        assert_eq!(texts(&body, "instanceId"), ids);
    }

    #[tokio::test]
    async fn fault_empty_describe_blanks_only_describe_instances() {
        let moto = shared_moto();
        let proxy = Ec2FaultProxy::start(&moto.endpoint()).expect("proxy");
        let tag = crate::unique("empty");
        proxy.set_mode(FaultMode::EmptyDescribe);

        // RunInstances is forwarded: the instance exists in moto.
        let (ids, _) = run_instances(&proxy.endpoint(), 1, &tag).await;
        let (_, _, direct) = describe_tagged(&moto.endpoint(), &tag).await;
        assert_eq!(texts(&direct, "instanceId"), ids);

        let (status, headers, body) = describe_tagged(&proxy.endpoint(), &tag).await;
        assert_eq!(status, 200);
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .expect("ascii")
                .starts_with("text/xml")
        );
        let id = texts(&body, "requestId").remove(0);
        assert_eq!(
            body,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse \
                 xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{id}</requestId>\
                 <reservationSet/></DescribeInstancesResponse>"
            )
        );
        // moto's own empty answer has the same shape (a self-closing reservationSet).
        let (_, _, none) = describe_tagged(&moto.endpoint(), &crate::unique("nothing")).await;
        assert!(none.contains("<reservationSet/>"), "{none}");

        let (status, _, regions) = ec2(&proxy.endpoint(), &[("Action", "DescribeRegions")]).await;
        assert_eq!(status, 200);
        assert!(texts(&regions, "regionName").contains(&"us-east-1".to_owned()));
    }

    #[tokio::test]
    async fn fault_hide_instances_against_moto() {
        let moto = shared_moto();
        let proxy = Ec2FaultProxy::start(&moto.endpoint()).expect("proxy");
        let tag = crate::unique("hide");
        let (pair, pair_reservation) = run_instances(&proxy.endpoint(), 2, &tag).await;
        let (single, single_reservation) = run_instances(&proxy.endpoint(), 1, &tag).await;
        let (_, _, direct) = describe_tagged(&moto.endpoint(), &tag).await;
        let mut all: Vec<String> = pair.iter().chain(&single).cloned().collect();
        let mut seen = texts(&direct, "instanceId");
        all.sort();
        seen.sort();
        assert_eq!(seen, all);

        // Hiding an unknown id changes nothing, byte for byte.
        proxy.set_mode(FaultMode::HideInstances(vec![
            "i-ffffffffffffffff0".to_owned(),
        ]));
        assert_eq!(describe_tagged(&proxy.endpoint(), &tag).await.2, direct);

        proxy.set_mode(FaultMode::HideInstances(vec![
            pair[1].clone(),
            single[0].clone(),
        ]));
        let (status, headers, hidden) = describe_tagged(&proxy.endpoint(), &tag).await;
        assert_eq!(status, 200, "{hidden}");
        assert_eq!(texts(&hidden, "instanceId"), [pair[0].clone()]);
        assert_eq!(texts(&hidden, "reservationId"), [pair_reservation]);
        assert!(!hidden.contains(&single_reservation));
        assert_eq!(
            headers[header::CONTENT_LENGTH],
            hidden.len().to_string().as_str(),
            "the length is the edited body's"
        );
        assert!(
            hidden.starts_with("<?xml")
                && hidden.trim_end().ends_with("</DescribeInstancesResponse>"),
            "{hidden}"
        );
        // Only DescribeInstances is edited; moto still has all three.
        let (_, _, direct_again) = describe_tagged(&moto.endpoint(), &tag).await;
        assert_eq!(direct_again, direct);

        // Error answers pass through unedited.
        let (status, _, error) = ec2(
            &proxy.endpoint(),
            &[
                ("Action", "DescribeInstances"),
                ("InstanceId.1", "i-00000000000000000"),
            ],
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(texts(&error, "Code"), ["InvalidInstanceID.NotFound"]);
    }

    #[tokio::test]
    async fn fault_delay_actions_sleeps_before_forwarding() {
        let moto = shared_moto();
        let proxy = Ec2FaultProxy::start(&moto.endpoint()).expect("proxy");
        let delay = Duration::from_millis(1500);
        proxy.set_mode(FaultMode::DelayActions {
            actions: vec!["DescribeRegions".to_owned()],
            delay,
        });
        let started = Instant::now();
        let (status, _, body) = ec2(&proxy.endpoint(), &[("Action", "DescribeRegions")]).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("DescribeRegionsResponse"),
            "forwarded: {body}"
        );
        assert!(started.elapsed() >= delay);

        let started = Instant::now();
        let (status, _, _) = ec2(
            &proxy.endpoint(),
            &[("Action", "DescribeAvailabilityZones")],
        )
        .await;
        assert_eq!(status, 200);
        assert!(started.elapsed() < delay, "other actions are not delayed");
        assert_eq!(proxy.calls("DescribeRegions"), 1);
        assert_eq!(proxy.total_calls(), 2);
    }

    #[tokio::test]
    async fn fault_unreachable_upstream_is_a_bad_gateway() {
        let port = crate::process::free_port().expect("port");
        let proxy = Ec2FaultProxy::start(&format!("http://127.0.0.1:{port}")).expect("proxy");
        let (status, _, _) = ec2(&proxy.endpoint(), &[("Action", "DescribeInstances")]).await;
        assert_eq!(status, 502);
        // A fault answered by the proxy needs no upstream.
        proxy.set_mode(FaultMode::EmptyDescribe);
        let (status, _, _) = ec2(&proxy.endpoint(), &[("Action", "DescribeInstances")]).await;
        assert_eq!(status, 200);

        let addr = proxy.addr();
        drop(proxy);
        assert!(TcpStream::connect(addr).await.is_err(), "stopped on drop");
    }
}
