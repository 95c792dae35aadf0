//! Launching machines with RunInstances.
//!
//! A launch is idempotent by its client token. EC2 honours the token by itself, but EC2
//! look-alikes (moto, in tests) may not, so the launch first looks for instances that an earlier
//! attempt with the same token made and returns those instead of launching again.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    IamInstanceProfileSpecification, InstanceType, ResourceType, ShutdownBehavior, Tag,
    TagSpecification,
};
use base64::Engine as _;

use super::super::{CloudHost, HostError, LaunchRequest};
use super::Ec2Hosts;
use super::describe::{cloud_host, filter};
use super::errors::sdk_error;

impl Ec2Hosts {
    pub(super) async fn launch_inner(
        &self,
        request: &LaunchRequest,
    ) -> Result<Vec<CloudHost>, HostError> {
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
}
