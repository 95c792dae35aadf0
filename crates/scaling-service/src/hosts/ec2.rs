//! [`HostHandler`] on Amazon EC2. The only module that imports the AWS SDK.
//!
//! One EC2 client per region, made on first use. The SDK's own retries are off, and so are the
//! executor's: every call goes through [`Ec2Hosts::retrying`], the one retry policy (backon's
//! jittered exponential backoff, [`Ec2Options::call_attempts`] attempts), which retries
//! throttling and transport failures and returns everything else at once, classified by
//! [`classify`]. Capacity shortages are returned untried, so the caller can try another type or
//! back off; the executor bounds a whole action with its deadline.
//!
//! The HTTPS client is `aws-smithy-http-client` with rustls on ring (the crypto the rest of the
//! workspace uses) instead of the SDK's default aws-lc-rs stack.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region, SharedHttpClient};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, Instance, InstanceStateName, InstanceType,
    ResourceType, ShutdownBehavior, Tag, TagSpecification,
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use backon::{ExponentialBuilder, Retryable};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

use super::{CloudHost, CloudState, Described, HostError, HostHandler, LaunchRequest};

/// The delay before the second attempt; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// EC2 accepts at most 1000 ids per TerminateInstances and 200 values per filter.
const TERMINATE_CHUNK: usize = 1000;
const FILTER_CHUNK: usize = 200;

/// How [`Ec2Hosts`] reaches EC2.
#[derive(Clone)]
pub struct Ec2Options {
    /// Sends every call here instead of the regional endpoint (moto in tests).
    pub endpoint_url: Option<String>,
    /// Static access key id and secret; `None` uses the SDK's default credentials chain.
    pub credentials: Option<(String, String)>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub instance_profile_arn: Option<String>,
    pub key_name: Option<String>,
    /// How often [`HostHandler::wait_running`] and [`HostHandler::wait_terminated`] look.
    pub poll_interval: Duration,
    /// Attempts one call gets, the first included, while it is throttled or fails in transport.
    pub call_attempts: u32,
}

impl Default for Ec2Options {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            credentials: None,
            subnet_id: None,
            security_group_ids: Vec::new(),
            instance_profile_arn: None,
            key_name: None,
            poll_interval: Duration::from_secs(1),
            call_attempts: 4,
        }
    }
}

impl fmt::Debug for Ec2Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Options")
            .field("endpoint_url", &self.endpoint_url)
            // The key id is not secret; the secret key never appears in logs.
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "<redacted>")),
            )
            .field("subnet_id", &self.subnet_id)
            .field("security_group_ids", &self.security_group_ids)
            .field("instance_profile_arn", &self.instance_profile_arn)
            .field("key_name", &self.key_name)
            .field("poll_interval", &self.poll_interval)
            .field("call_attempts", &self.call_attempts)
            .finish()
    }
}

/// Machines on EC2.
pub struct Ec2Hosts {
    options: Ec2Options,
    http: SharedHttpClient,
    /// The default chain's configuration, loaded once (only without static credentials).
    shared_config: tokio::sync::OnceCell<aws_config::SdkConfig>,
    clients: Mutex<HashMap<String, Client>>,
}

impl fmt::Debug for Ec2Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let regions: Vec<String> = self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        f.debug_struct("Ec2Hosts")
            .field("options", &self.options)
            .field("regions", &regions)
            .finish_non_exhaustive()
    }
}

impl Ec2Hosts {
    /// Makes no call: clients are made per region on first use.
    pub fn new(options: Ec2Options) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        Self {
            options,
            http,
            shared_config: tokio::sync::OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `region`, made on first use.
    async fn client(&self, region: &str) -> Client {
        if let Some(client) = self.cached(region) {
            return client;
        }
        let builder = match &self.options.credentials {
            Some((key_id, secret)) => aws_sdk_ec2::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .http_client(self.http.clone())
                .credentials_provider(Credentials::new(
                    key_id.clone(),
                    secret.clone(),
                    None,
                    None,
                    "whist-static",
                )),
            None => {
                let shared = self
                    .shared_config
                    .get_or_init(|| {
                        aws_config::defaults(BehaviorVersion::latest())
                            .http_client(self.http.clone())
                            .load()
                    })
                    .await;
                aws_sdk_ec2::config::Builder::from(shared)
            }
        };
        let mut builder = builder
            .region(Region::new(region.to_owned()))
            // One retry policy, ours: the SDK's would multiply the attempts.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(url) = &self.options.endpoint_url {
            builder = builder.endpoint_url(url.clone());
        }
        let client = Client::from_conf(builder.build());
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(region.to_owned())
            .or_insert(client)
            .clone()
    }

    fn cached(&self, region: &str) -> Option<Client> {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(region)
            .cloned()
    }

    async fn launch_inner(&self, request: &LaunchRequest) -> Result<Vec<CloudHost>, HostError> {
        if request.count == 0 {
            return Ok(Vec::new());
        }
        let count = i32::try_from(request.count)
            .map_err(|_| HostError::Refused(format!("cannot launch {} hosts", request.count)))?;
        let client = self.client(&request.region).await;

        // EC2 answers a repeated token with the first launch's instances by itself; looking
        // first keeps the guarantee on EC2 look-alikes that ignore the token (moto does).
        let earlier = self.launched_with_token(&client, request).await?;
        if !earlier.is_empty() {
            tracing::info!(
                region = %request.region,
                client_token = %request.client_token,
                ids = ?earlier.iter().map(|host| &host.id).collect::<Vec<_>>(),
                "launch already done with this client token"
            );
            return Ok(earlier);
        }

        let tags: Vec<Tag> = request
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect();
        let tag_specs = [ResourceType::Instance, ResourceType::Volume].map(|resource| {
            TagSpecification::builder()
                .resource_type(resource)
                .set_tags(Some(tags.clone()))
                .build()
        });
        let user_data = base64::engine::general_purpose::STANDARD.encode(&request.user_data);

        let output = self
            .retrying("RunInstances", || {
                let mut call = client
                    .run_instances()
                    .image_id(&request.image_id)
                    .instance_type(InstanceType::from(request.instance_type.as_str()))
                    .min_count(count)
                    .max_count(count)
                    .client_token(&request.client_token)
                    .user_data(&user_data)
                    .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                    .set_security_group_ids(
                        (!self.options.security_group_ids.is_empty())
                            .then(|| self.options.security_group_ids.clone()),
                    )
                    .set_subnet_id(self.options.subnet_id.clone())
                    .set_key_name(self.options.key_name.clone());
                if !tags.is_empty() {
                    call = call.set_tag_specifications(Some(tag_specs.to_vec()));
                }
                if let Some(arn) = &self.options.instance_profile_arn {
                    call = call.iam_instance_profile(
                        IamInstanceProfileSpecification::builder().arn(arn).build(),
                    );
                }
                async move {
                    call.send()
                        .await
                        .map_err(|error| sdk_error("RunInstances", error))
                }
            })
            .await?;

        let hosts: Vec<CloudHost> = output
            .instances()
            .iter()
            .map(|instance| {
                let mut host = cloud_host(&request.region, instance);
                // The launch response may leave the tags out; they were applied with it.
                for (key, value) in &request.tags {
                    host.tags
                        .entry(key.clone())
                        .or_insert_with(|| value.clone());
                }
                host
            })
            .collect();
        tracing::info!(
            region = %request.region,
            image_id = %request.image_id,
            instance_type = %request.instance_type,
            ids = ?hosts.iter().map(|host| &host.id).collect::<Vec<_>>(),
            "launched hosts"
        );
        Ok(hosts)
    }

    /// Instances (terminated ones included) that a launch with this request's token made.
    async fn launched_with_token(
        &self,
        client: &Client,
        request: &LaunchRequest,
    ) -> Result<Vec<CloudHost>, HostError> {
        // Narrowed by what every instance of that launch carries; the token is matched here
        // because moto does not know the `client-token` filter.
        let mut filters = vec![
            filter("image-id", [request.image_id.clone()]),
            filter("instance-type", [request.instance_type.clone()]),
        ];
        filters.extend(
            request
                .tags
                .iter()
                .map(|(key, value)| filter(&format!("tag:{key}"), [value.clone()])),
        );
        let instances = self.describe(client, &request.region, filters).await?;
        Ok(instances
            .into_iter()
            .filter(|seen| seen.client_token.as_deref() == Some(request.client_token.as_str()))
            .map(|seen| seen.host)
            .collect())
    }

    async fn terminate_inner(&self, region: &str, ids: &[String]) -> Result<(), HostError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client(region).await;
        for chunk in ids.chunks(TERMINATE_CHUNK) {
            let mut pending: Vec<String> = chunk.to_vec();
            // EC2 refuses the whole call when one id does not exist: narrow to those that do
            // and try again. Bounded, in case the view and the call keep disagreeing.
            for _ in 0..self.options.call_attempts.max(1) {
                if pending.is_empty() {
                    break;
                }
                let result = self
                    .retrying("TerminateInstances", || {
                        let call = client
                            .terminate_instances()
                            .set_instance_ids(Some(pending.clone()));
                        async move {
                            match call.send().await {
                                Ok(_) => Ok(true),
                                Err(error)
                                    if error.code() == Some("InvalidInstanceID.NotFound") =>
                                {
                                    Ok(false)
                                }
                                Err(error) => Err(sdk_error("TerminateInstances", error)),
                            }
                        }
                    })
                    .await?;
                if result {
                    tracing::info!(region, ids = ?pending, "terminating hosts");
                    pending.clear();
                    break;
                }
                let existing = self.describe_ids(&client, region, &pending).await?;
                pending = existing
                    .into_iter()
                    .filter(|seen| seen.host.state != CloudState::Terminated)
                    .map(|seen| seen.host.id)
                    .collect();
                tracing::info!(region, ids = ?pending, "some hosts to terminate were already gone");
            }
            if !pending.is_empty() {
                return Err(HostError::Failed(format!(
                    "TerminateInstances kept reporting unknown instances among {pending:?}"
                )));
            }
        }
        Ok(())
    }

    /// Polls until `done` holds for every machine in `ids` (absent ones are `None`), or `check`
    /// finds one that will never get there.
    async fn wait_for(
        &self,
        region: &str,
        ids: &[String],
        timeout: Duration,
        what: &'static str,
        judge: impl Fn(&str, Option<&Seen>) -> Judgement,
    ) -> Result<(), HostError> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client(region).await;
        let deadline = Instant::now() + timeout;
        loop {
            match self.describe_ids(&client, region, ids).await {
                Ok(seen) => {
                    let by_id: HashMap<&str, &Seen> = seen
                        .iter()
                        .map(|seen| (seen.host.id.as_str(), seen))
                        .collect();
                    let mut waiting = Vec::new();
                    for id in ids {
                        match judge(id, by_id.get(id.as_str()).copied()) {
                            Judgement::Done => {}
                            Judgement::Wait => waiting.push(id.as_str()),
                            Judgement::Never(error) => return Err(error),
                        }
                    }
                    if waiting.is_empty() {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        tracing::warn!(region, ?waiting, "timed out waiting for {what}");
                        return Err(HostError::Timeout(timeout, what));
                    }
                }
                // A failing API is waited out until the deadline; a refusal is final.
                Err(error) if !error.is_retryable() => return Err(error),
                Err(error) => {
                    if Instant::now() >= deadline {
                        tracing::warn!(region, %error, "timed out waiting for {what}");
                        return Err(HostError::Timeout(timeout, what));
                    }
                    tracing::debug!(region, %error, "describing hosts failed; polling on");
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(self.options.poll_interval.min(left)).await;
        }
    }
}

enum Judgement {
    Done,
    Wait,
    Never(HostError),
}

impl HostHandler for Ec2Hosts {
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        self.launch_inner(request).boxed()
    }

    fn terminate<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.terminate_inner(region, ids).boxed()
    }

    fn wait_running<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_for(region, ids, timeout, "hosts to run", |id, host| {
            // Absent: EC2's view lags a launch by a moment.
            let Some(seen) = host else {
                return Judgement::Wait;
            };
            match seen.host.state {
                CloudState::Running => Judgement::Done,
                CloudState::Pending | CloudState::Unknown => Judgement::Wait,
                CloudState::ShuttingDown
                | CloudState::Terminated
                | CloudState::Stopping
                | CloudState::Stopped => Judgement::Never(not_running(id, seen)),
            }
        })
        .boxed()
    }

    fn wait_terminated<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_for(region, ids, timeout, "hosts to terminate", |_, host| {
            // Absent: terminated long enough ago that EC2 forgot it (or never launched).
            match host.map(|seen| seen.host.state) {
                None | Some(CloudState::Terminated) => Judgement::Done,
                Some(_) => Judgement::Wait,
            }
        })
        .boxed()
    }

    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        async move {
            let client = self.client(region).await;
            let filters = vec![filter(&format!("tag:{}", tag.0), [tag.1.to_owned()])];
            let hosts = self.describe(&client, region, filters).await?;
            Ok(hosts.into_iter().map(|seen| seen.host).collect())
        }
        .boxed()
    }

    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>> {
        async move {
            let client = self.client(region).await;
            let mut described = Described::new();
            for chunk in ids.chunks(FILTER_CHUNK) {
                match self.describe_by_id(&client, region, chunk).await {
                    Ok(found) => described.extend(found),
                    // One unknown id fails the whole call; ask about each on its own so that the
                    // answer for every id is EC2's own.
                    Err(ById::NotFound) => {
                        for id in chunk {
                            match self
                                .describe_by_id(&client, region, std::slice::from_ref(id))
                                .await
                            {
                                Ok(found) => described.extend(found),
                                Err(ById::NotFound) => {
                                    described.insert(id.clone(), None);
                                }
                                Err(ById::Failed(error)) => return Err(error),
                            }
                        }
                    }
                    Err(ById::Failed(error)) => return Err(error),
                }
            }
            Ok(described)
        }
        .boxed()
    }
}

/// Why asking about machines by id gave no answer.
enum ById {
    /// EC2 does not know (one of) the ids.
    NotFound,
    Failed(HostError),
}

/// Why a machine awaited as running will never run. Capacity shortages say so, so that the
/// caller may try elsewhere; other client-side reasons (a bad snapshot, a volume limit) are
/// refusals; the rest (someone terminated or stopped it) is a failure worth another launch.
fn not_running(id: &str, seen: &Seen) -> HostError {
    let reason = seen.state_reason.as_deref().unwrap_or("no reason given");
    let detail = format!(
        "instance {id} is {:?} instead of running: {reason}",
        seen.host.state
    );
    if reason.contains("InsufficientInstanceCapacity") {
        HostError::InsufficientCapacity(detail)
    } else if reason.starts_with("Client.")
        && !reason.starts_with("Client.UserInitiatedShutdown")
        && !reason.starts_with("Client.InstanceInitiatedShutdown")
    {
        HostError::Refused(detail)
    } else {
        HostError::Failed(detail)
    }
}

fn filter<const N: usize>(name: &str, values: [String; N]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.to_vec()))
        .build()
}

/// A machine as DescribeInstances shows it, with what [`CloudHost`] leaves out.
#[derive(Debug)]
struct Seen {
    host: CloudHost,
    client_token: Option<String>,
    /// Why it is in its state (`Server.InsufficientInstanceCapacity`, ...), when EC2 says.
    state_reason: Option<String>,
}

impl Ec2Hosts {
    /// Machines among `ids`, in any state; unknown ids are left out rather than failing the
    /// call (an `instance-id` filter instead of `InstanceIds`). For waiting and narrowing, never
    /// as proof that a machine is gone.
    async fn describe_ids(
        &self,
        client: &Client,
        region: &str,
        ids: &[String],
    ) -> Result<Vec<Seen>, HostError> {
        let mut hosts = Vec::new();
        for chunk in ids.chunks(FILTER_CHUNK) {
            let filters = vec![
                Filter::builder()
                    .name("instance-id")
                    .set_values(Some(chunk.to_vec()))
                    .build(),
            ];
            hosts.extend(self.describe(client, region, filters).await?);
        }
        Ok(hosts)
    }

    /// DescribeInstances by `InstanceIds`: EC2's answer for exactly these ids, or NotFound.
    async fn describe_by_id(
        &self,
        client: &Client,
        region: &str,
        ids: &[String],
    ) -> Result<Described, ById> {
        let answer = self
            .retrying("DescribeInstances", || {
                let call = client
                    .describe_instances()
                    .set_instance_ids(Some(ids.to_vec()));
                async move {
                    match call.send().await {
                        Ok(output) => Ok(Some(output)),
                        Err(error) if error.code() == Some("InvalidInstanceID.NotFound") => {
                            Ok(None)
                        }
                        Err(error) => Err(sdk_error("DescribeInstances", error)),
                    }
                }
            })
            .await
            .map_err(ById::Failed)?;
        let Some(output) = answer else {
            return Err(ById::NotFound);
        };
        // Only EC2's own "not found" says a machine is unknown: an id a successful answer
        // leaves out is no answer at all, and stays out.
        let mut described = Described::new();
        for reservation in output.reservations() {
            for instance in reservation.instances() {
                let host = cloud_host(region, instance);
                if ids.contains(&host.id) {
                    described.insert(host.id.clone(), Some(host));
                }
            }
        }
        Ok(described)
    }

    /// Every page of DescribeInstances under `filters`. A failed page starts the listing over
    /// (within the retry budget).
    async fn describe(
        &self,
        client: &Client,
        region: &str,
        filters: Vec<Filter>,
    ) -> Result<Vec<Seen>, HostError> {
        self.retrying("DescribeInstances", || {
            let mut pages = client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .into_paginator()
                .send();
            async move {
                let mut hosts = Vec::new();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|error| sdk_error("DescribeInstances", error))?;
                    for reservation in page.reservations() {
                        for instance in reservation.instances() {
                            hosts.push(Seen {
                                host: cloud_host(region, instance),
                                client_token: instance.client_token().map(str::to_owned),
                                state_reason: instance
                                    .state_reason()
                                    .and_then(|reason| reason.code().or(reason.message()))
                                    .map(str::to_owned),
                            });
                        }
                    }
                }
                Ok(hosts)
            }
        })
        .await
    }

    /// The one retry policy: `call` runs up to [`Ec2Options::call_attempts`] times while it is
    /// throttled or fails in transport.
    async fn retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T, HostError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, HostError>>,
    {
        retrying(self.options.call_attempts, FIRST_BACKOFF, what, call).await
    }
}

fn cloud_host(region: &str, instance: &Instance) -> CloudHost {
    let state =
        instance
            .state()
            .and_then(|state| state.name())
            .map_or(CloudState::Unknown, |name| match name {
                InstanceStateName::Pending => CloudState::Pending,
                InstanceStateName::Running => CloudState::Running,
                InstanceStateName::ShuttingDown => CloudState::ShuttingDown,
                InstanceStateName::Terminated => CloudState::Terminated,
                InstanceStateName::Stopping => CloudState::Stopping,
                InstanceStateName::Stopped => CloudState::Stopped,
                _ => CloudState::Unknown,
            });
    let tags: BTreeMap<String, String> = instance
        .tags()
        .iter()
        .filter_map(|tag| Some((tag.key()?.to_owned(), tag.value().unwrap_or("").to_owned())))
        .collect();
    let launched_at = instance
        .launch_time()
        .and_then(|time| DateTime::<Utc>::from_timestamp(time.secs(), time.subsec_nanos()));
    CloudHost {
        id: instance.instance_id().unwrap_or_default().to_owned(),
        region: region.to_owned(),
        image_id: instance.image_id().unwrap_or_default().to_owned(),
        instance_type: instance
            .instance_type()
            .map(|kind| kind.as_str().to_owned())
            .unwrap_or_default(),
        state,
        tags,
        launched_at,
    }
}

/// Runs `call` up to `attempts` times while it fails with throttling or a transport failure,
/// sleeping a jittered, doubling delay from `first` (capped at [`MAX_BACKOFF`]) in between, so
/// that callers that failed together do not retry together. Capacity shortages and refusals
/// are returned at once.
async fn retrying<T, F, Fut>(
    attempts: u32,
    first: Duration,
    what: &str,
    call: F,
) -> Result<T, HostError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, HostError>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(first / 2)
        .with_max_delay(MAX_BACKOFF)
        .with_max_times(attempts.saturating_sub(1) as usize)
        .with_jitter();
    call.retry(policy)
        .sleep(tokio::time::sleep)
        .when(retried_here)
        .notify(|error, delay| tracing::warn!(%error, ?delay, "{what} failed; retrying"))
        .await
}

fn retried_here(error: &HostError) -> bool {
    matches!(error, HostError::Throttled(_) | HostError::Failed(_))
}

fn sdk_error<E>(operation: &str, error: SdkError<E>) -> HostError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code();
            let message = service.err().message().unwrap_or("no message");
            classify(
                code,
                Some(status),
                format!(
                    "{operation}: {}: {message}",
                    code.unwrap_or("unknown error")
                ),
            )
        }
        SdkError::ConstructionFailure(_) => {
            HostError::Refused(format!("{operation}: {}", DisplayErrorContext(&error)))
        }
        // Timeouts, dispatch (connection) failures, unreadable responses.
        _ => HostError::Failed(format!("{operation}: {}", DisplayErrorContext(&error))),
    }
}

/// Sorts an EC2 error by its code (and, for codes it does not know, the HTTP status).
///
/// Throttling is retried; capacity shortages are worth another type or zone; requests that
/// cannot succeed as sent are refused; server errors and anything unknown are failures, retried.
pub fn classify(code: Option<&str>, status: Option<u16>, detail: String) -> HostError {
    let Some(code) = code else {
        return HostError::Failed(detail);
    };
    const THROTTLED: [&str; 4] = [
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    ];
    const CAPACITY: [&str; 8] = [
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientFreeAddressesInSubnet",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        // "The requested configuration is currently not supported": this type in this zone.
        "Unsupported",
    ];
    const REFUSED: [&str; 10] = [
        "UnauthorizedOperation",
        "AuthFailure",
        "IdempotentParameterMismatch",
        "OptInRequired",
        "Blocked",
        "PendingVerification",
        "SignatureDoesNotMatch",
        "InvalidClientTokenId",
        "UnsupportedOperation",
        "DryRunOperation",
    ];
    const REFUSED_PREFIXES: [&str; 3] = ["Invalid", "Missing", "UnknownParameter"];
    const FAILED: [&str; 5] = [
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestExpired",
    ];
    if THROTTLED.contains(&code) {
        HostError::Throttled(detail)
    } else if CAPACITY.contains(&code) {
        HostError::InsufficientCapacity(detail)
    } else if FAILED.contains(&code) {
        HostError::Failed(detail)
    } else if REFUSED.contains(&code)
        || REFUSED_PREFIXES
            .iter()
            .any(|prefix| code.starts_with(prefix))
        || code.ends_with(".NotFound")
        || code.ends_with(".Malformed")
    {
        HostError::Refused(detail)
    } else if status == Some(429) {
        HostError::Throttled(detail)
    } else {
        // Unknown: retried, the conservative reading of a code this table lacks.
        HostError::Failed(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(error: &HostError) -> &'static str {
        match error {
            HostError::Throttled(_) => "throttled",
            HostError::InsufficientCapacity(_) => "capacity",
            HostError::Refused(_) => "refused",
            HostError::Timeout(..) => "timeout",
            HostError::Failed(_) => "failed",
        }
    }

    fn classified(code: Option<&str>, status: Option<u16>) -> &'static str {
        kind(&classify(code, status, "detail".to_owned()))
    }

    #[test]
    fn throttling_codes_are_throttled() {
        for code in ["RequestLimitExceeded", "Throttling", "ThrottlingException"] {
            assert_eq!(classified(Some(code), Some(503)), "throttled", "{code}");
        }
        assert_eq!(classified(Some("SomethingNew"), Some(429)), "throttled");
    }

    #[test]
    fn capacity_codes_are_insufficient_capacity() {
        for code in [
            "InsufficientInstanceCapacity",
            "InstanceLimitExceeded",
            "InsufficientHostCapacity",
            "Unsupported",
            "VcpuLimitExceeded",
        ] {
            assert_eq!(classified(Some(code), Some(400)), "capacity", "{code}");
        }
    }

    #[test]
    fn requests_that_cannot_succeed_are_refused() {
        for code in [
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "InvalidParameterValue",
            "InvalidParameterCombination",
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.Malformed",
            "UnauthorizedOperation",
            "AuthFailure",
            "IdempotentParameterMismatch",
            "MissingParameter",
            "InvalidSubnetID.NotFound",
            "InvalidGroup.NotFound",
            "OptInRequired",
        ] {
            assert_eq!(classified(Some(code), Some(400)), "refused", "{code}");
        }
    }

    #[test]
    fn server_and_transport_failures_are_failed() {
        assert_eq!(classified(None, None), "failed");
        assert_eq!(classified(None, Some(500)), "failed");
        assert_eq!(classified(Some("InternalError"), Some(500)), "failed");
        assert_eq!(classified(Some("Unavailable"), Some(503)), "failed");
        assert_eq!(classified(Some("SomethingNew"), Some(400)), "failed");
    }

    #[test]
    fn retryability_follows_the_classes() {
        assert!(classify(Some("Throttling"), Some(400), String::new()).is_retryable());
        assert!(classify(Some("InsufficientInstanceCapacity"), None, String::new()).is_retryable());
        assert!(!classify(Some("InvalidAMIID.NotFound"), None, String::new()).is_retryable());
        assert!(classify(None, None, String::new()).is_retryable());
    }

    #[test]
    fn detail_is_kept() {
        let error = classify(
            Some("InvalidAMIID.NotFound"),
            Some(400),
            "RunInstances: InvalidAMIID.NotFound: no such image".to_owned(),
        );
        assert!(error.to_string().contains("no such image"), "{error}");
    }

    #[tokio::test]
    async fn retries_stop_at_the_first_unretried_error() {
        let mut calls = 0;
        let result: Result<(), HostError> = retrying(5, Duration::from_millis(1), "Test", || {
            calls += 1;
            let error = if calls < 3 {
                HostError::Throttled("slow down".to_owned())
            } else {
                HostError::Refused("no".to_owned())
            };
            async move { Err(error) }
        })
        .await;
        assert!(matches!(result, Err(HostError::Refused(_))));
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn retries_give_up_after_the_attempts() {
        let mut calls = 0;
        let result: Result<(), HostError> = retrying(5, Duration::from_millis(1), "Test", || {
            calls += 1;
            async { Err(HostError::Failed("down".to_owned())) }
        })
        .await;
        assert!(matches!(result, Err(HostError::Failed(_))));
        assert_eq!(calls, 5);
    }

    #[tokio::test]
    async fn capacity_is_returned_without_retrying() {
        let mut calls = 0;
        let result: Result<(), HostError> = retrying(5, Duration::from_millis(1), "Test", || {
            calls += 1;
            async { Err(HostError::InsufficientCapacity("none".to_owned())) }
        })
        .await;
        assert!(matches!(result, Err(HostError::InsufficientCapacity(_))));
        assert_eq!(calls, 1);
    }

    #[test]
    fn machines_that_will_never_run_are_named() {
        let host = |reason: &str| Seen {
            host: CloudHost {
                id: "i-1".to_owned(),
                region: "us-east-1".to_owned(),
                image_id: "ami-1".to_owned(),
                instance_type: "g4dn.xlarge".to_owned(),
                state: CloudState::Terminated,
                tags: BTreeMap::new(),
                launched_at: None,
            },
            client_token: None,
            state_reason: Some(reason.to_owned()),
        };
        let error = not_running("i-1", &host("Server.InsufficientInstanceCapacity"));
        assert_eq!(kind(&error), "capacity");
        assert!(error.to_string().contains("i-1"), "{error}");
        assert_eq!(
            kind(&not_running(
                "i-1",
                &host("Client.InvalidSnapshot.NotFound")
            )),
            "refused"
        );
        assert_eq!(
            kind(&not_running("i-1", &host("Client.UserInitiatedShutdown"))),
            "failed"
        );
    }
}
