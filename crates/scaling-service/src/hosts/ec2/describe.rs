//! Reading machines back with DescribeInstances, and turning EC2's instances into [`CloudHost`]s.
//!
//! There are two ways to ask, and they prove different things:
//! - by filter ([`Ec2Hosts::describe`], every page of the answer): unknown ids are simply left
//!   out, which is fine for listing, waiting and narrowing but proves nothing about a machine
//!   the answer lacks;
//! - by `InstanceIds` ([`Ec2Hosts::describe_by_id`]): EC2 either answers for those ids or says
//!   `InvalidInstanceID.NotFound`, the positive "gone" that deleting a row needs.

use std::collections::BTreeMap;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, Instance, InstanceStateName};
use chrono::{DateTime, Utc};

use super::super::{CloudHost, CloudState, Described, HostError};
use super::Ec2Hosts;
use super::errors::sdk_error;

/// EC2 accepts at most 200 values per filter; asks by `InstanceIds` are cut the same way.
const FILTER_CHUNK: usize = 200;

/// A machine as DescribeInstances shows it, with what [`CloudHost`] leaves out.
#[derive(Debug)]
pub(super) struct Seen {
    pub(super) host: CloudHost,
    pub(super) client_token: Option<String>,
    /// Why it is in its state (`Server.InsufficientInstanceCapacity`, ...), when EC2 says.
    pub(super) state_reason: Option<String>,
}

/// Why asking about machines by id gave no answer.
enum ById {
    /// EC2 does not know (one of) the ids.
    NotFound,
    Failed(HostError),
}

impl Ec2Hosts {
    /// What [`HostHandler::list`](crate::hosts::HostHandler::list) answers: every machine
    /// carrying the tag, in any state.
    pub(super) async fn list_inner(
        &self,
        region: &str,
        tag: (&str, &str),
    ) -> Result<Vec<CloudHost>, HostError> {
        let client = self.client(region).await;
        let filters = vec![filter(&format!("tag:{}", tag.0), [tag.1.to_owned()])];
        let hosts = self.describe(&client, region, filters).await?;
        Ok(hosts.into_iter().map(|seen| seen.host).collect())
    }

    /// What [`HostHandler::describe`](crate::hosts::HostHandler::describe) answers: EC2's own
    /// answer for every id, `None` where it says it does not know the id.
    pub(super) async fn describe_inner(
        &self,
        region: &str,
        ids: &[String],
    ) -> Result<Described, HostError> {
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

    /// Machines among `ids`, in any state; unknown ids are left out rather than failing the
    /// call (an `instance-id` filter instead of `InstanceIds`). For waiting and narrowing, never
    /// as proof that a machine is gone.
    pub(super) async fn describe_ids(
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
    pub(super) async fn describe(
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
}

/// A DescribeInstances filter matching any of `values`.
pub(super) fn filter<const N: usize>(name: &str, values: [String; N]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.to_vec()))
        .build()
}

/// The SDK's instance as the fleet sees a machine. Missing fields become empty rather than
/// errors: a half-filled answer from EC2 (or a look-alike) should not fail a whole listing.
pub(super) fn cloud_host(region: &str, instance: &Instance) -> CloudHost {
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
