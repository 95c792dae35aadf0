//! Loopback fault injection for tests: an EC2 API proxy that can throttle, blank or hide
//! answers, and a TCP proxy whose connections can be cut.
//!
//! - [`Ec2FaultProxy`] sits between an AWS SDK client and moto. It forwards EC2 Query requests
//!   (`POST /` with a form body naming the `Action`) unchanged, counts them per action, and on
//!   demand answers them itself the way EC2 does when it is throttling or degraded
//!   ([`FaultMode`]). moto cannot be asked to misbehave, and the fleet controller's handling of
//!   `RequestLimitExceeded`, of a DescribeInstances that momentarily omits a launched instance
//!   (EC2 is eventually consistent) and of slow calls is exactly what needs proving.
//! - [`CuttableProxy`] forwards bytes between a client and a TCP upstream (the GraphQL engine,
//!   websockets included) and can close every connection and refuse new ones until restored,
//!   which is how a test makes a service lose the engine without stopping the engine for the
//!   other tests that share it.
//!
//! Both run on a background thread with a tokio runtime of their own, so they work from a plain
//! `#[test]` as well as from any `#[tokio::test]` runtime flavour, and a blocked or finished test
//! runtime cannot stall them. Dropping one stops its thread and closes its connections.
//!
//! Everything listens on 127.0.0.1 and [`Ec2FaultProxy::start`] refuses a non-loopback upstream,
//! so no test can be pointed at the real AWS through it.
//!
//! The AWS SDK signs requests (SigV4) over the Host header, which the proxy rewrites to the
//! upstream's; that is harmless because moto does not verify signatures. moto does read the
//! `Authorization` header, though: a request without one is routed to its S3 backend (a POST to
//! `/` without credentials comes back as S3's `ListAllMyBucketsResult`), so raw test requests
//! must carry a SigV4-shaped header (see the tests' `EC2_AUTH`).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, request};
use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

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

/// One element of an XML document, as byte ranges into it.
#[derive(Debug, Clone)]
struct Element {
    name: String,
    /// From its `<` to just after its closing `>`.
    outer: Range<usize>,
    /// Its content (empty for `<name/>`).
    inner: Range<usize>,
}

/// The direct child elements within `range` of `xml`, skipping the prolog, comments, CDATA
/// sections and text. This is just enough XML for EC2's responses (no entities need resolving
/// to find an instance id), not a general parser; it fails on unbalanced tags rather than
/// guessing.
fn child_elements(xml: &str, range: Range<usize>) -> Result<Vec<Element>, String> {
    let bytes = xml.as_bytes();
    let end = range.end;
    let mut children = Vec::new();
    // The open elements below `range`: their names, and where the outermost one started.
    let mut open: Vec<&str> = Vec::new();
    let mut outer_start = 0;
    let mut inner_start = 0;
    let mut pos = range.start;
    let skip_to = |from: usize, terminator: &str| -> Result<usize, String> {
        xml[from..end]
            .find(terminator)
            .map(|at| from + at + terminator.len())
            .ok_or_else(|| format!("no {terminator:?} after byte {from}"))
    };
    while let Some(at) = xml[pos..end].find('<') {
        let tag = pos + at;
        let rest = &xml[tag..end];
        if rest.starts_with("<?") {
            pos = skip_to(tag, "?>")?;
        } else if rest.starts_with("<!--") {
            pos = skip_to(tag, "-->")?;
        } else if rest.starts_with("<![CDATA[") {
            pos = skip_to(tag, "]]>")?;
        } else if rest.starts_with("<!") {
            pos = skip_to(tag, ">")?;
        } else if let Some(closing) = rest.strip_prefix("</") {
            let close = skip_to(tag, ">")?;
            let name = closing[..close - tag - 3].trim_end();
            match open.pop() {
                Some(expected) if expected == name => {}
                expected => {
                    return Err(format!("</{name}> at byte {tag} closes {expected:?}"));
                }
            }
            if open.is_empty() {
                children.push(Element {
                    name: name.to_owned(),
                    outer: outer_start..close,
                    inner: inner_start..tag,
                });
            }
            pos = close;
        } else {
            // A start tag; `>` inside a quoted attribute value does not end it.
            let mut quote = None;
            let mut close = None;
            for (offset, &byte) in bytes[tag + 1..end].iter().enumerate() {
                match (quote, byte) {
                    (None, b'"' | b'\'') => quote = Some(byte),
                    (Some(q), _) if q == byte => quote = None,
                    (None, b'>') => {
                        close = Some(tag + 1 + offset + 1);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.ok_or_else(|| format!("unterminated tag at byte {tag}"))?;
            let self_closing = bytes[close - 2] == b'/';
            let name_end = xml[tag + 1..close]
                .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
                .map_or(close, |at| tag + 1 + at);
            let name = &xml[tag + 1..name_end];
            if name.is_empty() {
                return Err(format!("a tag without a name at byte {tag}"));
            }
            if open.is_empty() {
                outer_start = tag;
                inner_start = close;
            }
            if self_closing {
                if open.is_empty() {
                    children.push(Element {
                        name: name.to_owned(),
                        outer: tag..close,
                        inner: close..close,
                    });
                }
            } else {
                open.push(name);
            }
            pos = close;
        }
    }
    if let Some(name) = open.last() {
        return Err(format!("<{name}> is never closed"));
    }
    Ok(children)
}

/// The first direct child of `parent` called `name`.
fn child(xml: &str, parent: &Element, name: &str) -> Result<Option<Element>, String> {
    Ok(child_elements(xml, parent.inner.clone())?
        .into_iter()
        .find(|element| element.name == name))
}

/// `xml` (a DescribeInstancesResponse) without the instances whose `<instanceId>` is in
/// `hidden`, and without any reservation left empty by that. The layout moto writes:
///
/// ```text
/// DescribeInstancesResponse > reservationSet > item (a reservation)
///     > reservationId, ownerId, groupSet, instancesSet > item (an instance) > instanceId, ...
/// ```
///
/// An instance `item` holds nested `item`s of its own (block devices, network interfaces,
/// security groups, tags), and moto writes `instanceId` after some of them, so only a direct
/// child `instanceId` of a direct child `item` of `instancesSet` identifies the instance.
fn hide_instances(xml: &str, hidden: &[String]) -> Result<String, String> {
    let root = child_elements(xml, 0..xml.len())?
        .into_iter()
        .next()
        .ok_or("no root element")?;
    if root.name != "DescribeInstancesResponse" {
        return Err(format!("the root element is <{}>", root.name));
    }
    let reservations = child(xml, &root, "reservationSet")?.ok_or("no <reservationSet>")?;
    let mut cuts: Vec<Range<usize>> = Vec::new();
    for reservation in child_elements(xml, reservations.inner)? {
        if reservation.name != "item" {
            continue;
        }
        let Some(instances) = child(xml, &reservation, "instancesSet")? else {
            continue;
        };
        let items: Vec<Element> = child_elements(xml, instances.inner)?
            .into_iter()
            .filter(|element| element.name == "item")
            .collect();
        let mut removed = Vec::new();
        for item in &items {
            let id = child(xml, item, "instanceId")?.ok_or_else(|| {
                format!(
                    "an instance item at byte {} has no <instanceId>",
                    item.outer.start
                )
            })?;
            let id = xml[id.inner].trim();
            if hidden.iter().any(|hidden| hidden == id) {
                removed.push(item.outer.clone());
            }
        }
        if !removed.is_empty() && removed.len() == items.len() {
            cuts.push(reservation.outer);
        } else {
            cuts.extend(removed);
        }
    }
    // The cuts are in document order and do not overlap: one per reservation, or its items.
    let mut out = String::with_capacity(xml.len());
    let mut kept_from = 0;
    for cut in cuts {
        out.push_str(&xml[kept_from..cut.start]);
        kept_from = cut.end;
    }
    out.push_str(&xml[kept_from..]);
    Ok(out)
}

/// A TCP proxy on a loopback port to `upstream` whose connections can be cut.
///
/// It copies bytes both ways and knows nothing of the protocol, so HTTP, websockets and the
/// Postgres protocol all pass. [`CuttableProxy::cut`] closes every open connection; while cut,
/// new connections are accepted and closed at once, so a client sees its connection end
/// immediately (as when a server goes away) and its reconnect loop runs at the pace of its own
/// backoff, rather than hanging on a connect that never completes.
pub struct CuttableProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    stats: Arc<TcpStats>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct TcpStats {
    /// Connections forwarded to the upstream, ever.
    accepted: AtomicUsize,
    /// Connections closed on arrival because the proxy was cut.
    refused: AtomicUsize,
    /// Connections being forwarded now.
    open: AtomicUsize,
}

/// Counts a forwarded connection as open for as long as its task holds this.
struct OpenGuard(Arc<TcpStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CuttableProxy {
    /// Starts forwarding from a free loopback port to `upstream`. Refuses a non-loopback
    /// upstream.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        if !upstream.ip().is_loopback() {
            bail!("the cuttable proxy only forwards to a loopback address, not {upstream}");
        }
        let cut = Arc::new(watch::Sender::new(false));
        let stats = Arc::new(TcpStats::default());
        let (addr, shutdown, thread) = {
            let cut = Arc::clone(&cut);
            let stats = Arc::clone(&stats);
            spawn_server("whist-cuttable-proxy", move |listener, stop| async move {
                tokio::select! {
                    () = accept_loop(listener, upstream, cut, stats) => {}
                    _ = stop => {}
                }
            })?
        };
        Ok(Self {
            addr,
            upstream,
            cut,
            stats,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The loopback address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every open connection and refuses new ones until [`CuttableProxy::restore`].
    /// Returns once every connection is closed (or after 5 s), so what a test does next
    /// already sees the cut.
    pub fn cut(&self) {
        self.cut.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.stats.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// How many connections have been forwarded since the start (a reconnect counts anew).
    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// How many connections were closed on arrival because the proxy was cut.
    pub fn refused(&self) -> usize {
        self.stats.refused.load(Ordering::SeqCst)
    }

    /// How many connections are being forwarded now.
    pub fn open_connections(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for CuttableProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CuttableProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("cut", &self.is_cut())
            .field("open", &self.open_connections())
            .finish_non_exhaustive()
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        stop_server(self.shutdown.take(), self.thread.take());
    }
}

/// Accepts connections and forwards each in a task of a `JoinSet` owned by this future, so
/// dropping the future (on shutdown) ends them all.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    stats: Arc<TcpStats>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let mut client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Transient (a reset before accept, or out of descriptors): try again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if *cut.borrow() {
            stats.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        stats.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(Arc::clone(&stats));
        // Subscribed before the task runs; `wait_for` looks at the current value first, so a
        // cut between the check above and here is not missed.
        let mut cut = cut.subscribe();
        connections.spawn(async move {
            let _guard = guard;
            let upstream = tokio::select! {
                connected = TcpStream::connect(upstream) => connected,
                _ = cut.wait_for(|cut| *cut) => return,
            };
            // An unreachable upstream: the client sees its connection closed.
            let Ok(mut upstream) = upstream else { return };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                _ = cut.wait_for(|cut| *cut) => {}
            }
            // Both sockets close as they drop here.
        });
    }
}

/// Binds a loopback port here (so the address is known and a bind failure is reported to the
/// caller), then runs `serve(listener, stop)` on a new thread with a current-thread runtime.
/// When `serve` returns (it should on `stop`), the runtime is dropped, which drops every task
/// still on it and so closes their connections.
fn spawn_server<F, Fut>(
    name: &str,
    serve: F,
) -> anyhow::Result<(SocketAddr, oneshot::Sender<()>, JoinHandle<()>)>
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a loopback port")?;
    listener
        .set_nonblocking(true)
        .context("make the listener non-blocking")?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the proxy's runtime")?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                // `from_std` fails only without an I/O driver, which this runtime has.
                if let Ok(listener) = TcpListener::from_std(listener) {
                    serve(listener, stop_rx).await;
                }
            });
            drop(runtime);
        })
        .with_context(|| format!("start the {name} thread"))?;
    Ok((addr, stop_tx, thread))
}

fn stop_server(shutdown: Option<oneshot::Sender<()>>, thread: Option<JoinHandle<()>>) {
    if let Some(shutdown) = shutdown {
        let _ = shutdown.send(());
    }
    if let Some(thread) = thread {
        let _ = thread.join();
    }
}

/// Locks a mutex, ignoring poisoning: the data (counts, a mode) stays consistent whatever
/// panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moto::shared_moto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// The text of every `<name>` in `xml` (at any depth), in document order.
    fn texts(xml: &str, name: &str) -> Vec<String> {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        xml.match_indices(&open)
            .map(|(at, _)| {
                let start = at + open.len();
                let end = start + xml[start..].find(&close).expect("closed");
                xml[start..end].to_owned()
            })
            .collect()
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

    /// moto's layout, trimmed: nested `item`s in an instance before its `instanceId`, and a
    /// reservation of two instances next to one of one.
    const DESCRIBE: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n\
        <DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15\">\
        <reservationSet>\
        <item><reservationId>r-a</reservationId><groupSet/><instancesSet>\
        <item><blockDeviceMapping><item><deviceName>/dev/sda1</deviceName></item></blockDeviceMapping>\
        <groupSet><item><groupId>sg-1</groupId></item></groupSet><instanceId>i-a1</instanceId></item>\
        <item><tagSet><item><key>k</key><value>i-b1</value></item></tagSet><instanceId>i-a2</instanceId></item>\
        </instancesSet></item>\
        <item><reservationId>r-b</reservationId><instancesSet>\
        <item><stateReason><code/><message/></stateReason><instanceId> i-b1 </instanceId></item>\
        </instancesSet></item>\
        </reservationSet><requestId>request-id</requestId></DescribeInstancesResponse>";

    #[test]
    fn fault_hide_instances_edits_moto_shaped_xml() {
        let hide = |ids: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
            hide_instances(DESCRIBE, &ids).expect("filtered")
        };
        assert_eq!(hide(&[]), DESCRIBE);
        assert_eq!(hide(&["i-zzz"]), DESCRIBE);

        // One of two: the reservation stays with the other.
        let one = hide(&["i-a2"]);
        assert_eq!(texts(&one, "instanceId"), ["i-a1", " i-b1 "]);
        assert_eq!(texts(&one, "reservationId"), ["r-a", "r-b"]);
        assert!(!one.contains("<key>k</key>"), "the whole item went");

        // The only one (the id is matched trimmed, and not by the tag value that equals it):
        // the reservation goes.
        let only = hide(&["i-b1"]);
        assert_eq!(texts(&only, "instanceId"), ["i-a1", "i-a2"]);
        assert_eq!(texts(&only, "reservationId"), ["r-a"]);

        let all = hide(&["i-a1", "i-a2", "i-b1"]);
        assert!(
            all.ends_with(
                "<reservationSet></reservationSet><requestId>request-id</requestId>\
                 </DescribeInstancesResponse>"
            ),
            "{all}"
        );
        // Still well formed.
        let root = child_elements(&all, 0..all.len()).expect("parses");
        assert_eq!(root.len(), 1);
        assert_eq!(root[0].name, "DescribeInstancesResponse");

        // What the filter cannot read is an error, not a silent pass.
        let ids = ["i-a1".to_owned()];
        assert!(hide_instances("<Response><Errors/></Response>", &ids).is_err());
        assert!(hide_instances("<DescribeInstancesResponse><reservationSet>", &ids).is_err());
        assert!(
            hide_instances(
                "<DescribeInstancesResponse><reservationSet><item><instancesSet><item><x/></item>\
                 </instancesSet></item></reservationSet></DescribeInstancesResponse>",
                &ids
            )
            .is_err()
        );
        assert!(hide_instances("<a><b></a></b>", &ids).is_err());
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
        assert!(CuttableProxy::start(upstream).is_err());
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
        let root = child_elements(&hidden, 0..hidden.len()).expect("well formed");
        assert_eq!(root[0].name, "DescribeInstancesResponse");
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

    /// An echo server on a loopback port, on the test's runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("echo");
        echoed
    }

    /// Whether the peer has closed `stream`: a read ends (EOF or reset) within 5 s.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn fault_cuttable_proxy_cuts_and_restores() {
        let echo = echo_server().await;
        let proxy = CuttableProxy::start(echo).expect("proxy");
        assert_eq!(proxy.upstream(), echo);

        let mut first = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut second = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut first, b"hello").await, b"hello");
        assert_eq!(round_trip(&mut second, b"world").await, b"world");
        assert_eq!(proxy.open_connections(), 2);

        proxy.cut();
        assert!(proxy.is_cut());
        assert_eq!(
            proxy.open_connections(),
            0,
            "cut returns once they are closed"
        );
        assert!(closed(&mut first).await);
        assert!(closed(&mut second).await);

        // While cut, a connection is accepted and closed at once.
        for _ in 0..2 {
            let mut refused = TcpStream::connect(proxy.addr()).await.expect("connect");
            let _ = refused.write_all(b"anyone?").await;
            assert!(closed(&mut refused).await);
        }
        assert_eq!(proxy.refused(), 2);

        proxy.restore();
        assert!(!proxy.is_cut());
        let mut third = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut third, b"again").await, b"again");
        assert_eq!(proxy.accepted(), 3);

        // Large transfers pass both ways intact (a websocket is just bytes to it).
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = third.split();
        let (_, echoed) = tokio::join!(
            async { write.write_all(&big).await.expect("write") },
            async {
                let mut echoed = vec![0; big.len()];
                read.read_exact(&mut echoed).await.expect("read");
                echoed
            }
        );
        assert!(echoed == big);

        let addr = proxy.addr();
        drop(proxy);
        assert!(closed(&mut third).await, "drop closes the connections");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "and stops listening"
        );
    }

    #[test]
    fn fault_cuttable_proxy_works_from_a_plain_test() {
        use std::io::{Read, Write};
        let upstream = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let proxy = CuttableProxy::start(upstream.local_addr().expect("addr")).expect("proxy");
        let mut client = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        let (mut server, _) = upstream.accept().expect("accept");
        client.write_all(b"ping").expect("write");
        let mut got = [0; 4];
        server.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");

        proxy.cut();
        // The upstream side is closed too, so the server sees the client go.
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(matches!(server.read(&mut got), Ok(0) | Err(_)));
    }
}
