//! [`HostHandler`] on Amazon EC2. This directory is the only place that imports the AWS SDK.
//!
//! One EC2 client per region, made on first use. The SDK's own retries are off, and so are the
//! executor's: every call goes through [`Ec2Hosts::retrying`], the one retry policy (backon's
//! jittered exponential backoff, [`Ec2Options::call_attempts`] attempts), which retries
//! throttling and transport failures and returns everything else at once, classified by
//! [`classify`]. Capacity shortages are returned untried, so the caller can try another type or
//! back off; the executor bounds a whole action with its deadline.
//!
//! This file holds the public face (the options, the [`Ec2Hosts`] type and its [`HostHandler`]
//! impl, which only hands each call to the file that does the work):
//! - `client.rs`: the HTTPS stack (rustls on ring) and the per-region SDK clients;
//! - `launch.rs`: RunInstances, with the client-token check that keeps launches idempotent;
//! - `terminate.rs`: TerminateInstances, narrowed when EC2 no longer knows some ids;
//! - `describe.rs`: DescribeInstances (paginated and by id) and the SDK → [`CloudHost`] mapping;
//! - `waiters.rs`: polling until machines run or are gone (used by tests and benchmarks only);
//! - `errors.rs`: the retry policy and the sorting of EC2 errors into [`HostError`] kinds.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::SharedHttpClient;
use futures::FutureExt;
use futures::future::BoxFuture;

use super::{CloudHost, Described, HostError, HostHandler, LaunchRequest};

mod client;
mod describe;
mod errors;
mod launch;
mod terminate;
mod waiters;

pub use errors::classify;

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
        Self {
            options,
            http: client::https_client(),
            shared_config: tokio::sync::OnceCell::new(),
            clients: Mutex::new(HashMap::new()),
        }
    }
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
        self.wait_running_inner(region, ids, timeout).boxed()
    }

    fn wait_terminated<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.wait_terminated_inner(region, ids, timeout).boxed()
    }

    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        self.list_inner(region, tag).boxed()
    }

    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>> {
        self.describe_inner(region, ids).boxed()
    }
}
