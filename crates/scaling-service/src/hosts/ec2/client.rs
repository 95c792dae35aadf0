//! Setting up the aws-sdk-ec2 clients: the HTTPS stack and one client per region.
//!
//! The HTTPS client is `aws-smithy-http-client` with rustls on ring (the crypto the rest of the
//! workspace uses) instead of the SDK's default aws-lc-rs stack. Clients are made lazily, on the
//! first call for a region, so that constructing [`Ec2Hosts`] never touches the network or the
//! credentials chain.

use std::sync::PoisonError;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region, SharedHttpClient};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use super::Ec2Hosts;

/// The HTTPS client every regional EC2 client shares.
pub(super) fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

impl Ec2Hosts {
    /// The client for `region`, made on first use.
    pub(super) async fn client(&self, region: &str) -> Client {
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
        // Two first calls for one region may race to here; the loser's client is dropped so
        // that every caller ends up sharing the one kept.
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
}
