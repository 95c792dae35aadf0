//! The EC2 host handler against moto on loopback: launches, idempotency, listing, waits and
//! terminations. Every test tags its machines with its own value, so tests sharing the server
//! never see each other's machines. Nothing here reaches the real AWS: the clients get moto's
//! endpoint and static credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use base64::Engine as _;
use scaling_service::hosts::conformance::{self, Subject, TAG, ids, unique};
use scaling_service::hosts::ec2::{Ec2Hosts, Ec2Options};
use scaling_service::hosts::{HostError, HostHandler};
use whist_test_support::shared_moto;

const REGION: &str = "us-east-1";
/// One of the images moto knows from the start (it accepts unknown ones too).
const IMAGE: &str = "ami-12c6146b";

fn hosts() -> Ec2Hosts {
    Ec2Hosts::new(Ec2Options {
        endpoint_url: Some(shared_moto().endpoint()),
        credentials: Some(("testing".to_owned(), "testing".to_owned())),
        poll_interval: Duration::from_millis(100),
        ..Ec2Options::default()
    })
}

/// A raw client on moto, for looking behind the handler's back.
fn raw_client() -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(shared_moto().endpoint())
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(Provider::Rustls(CryptoMode::Ring))
                .build_https(),
        )
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

fn subject(hosts: &Ec2Hosts) -> Subject<'_> {
    Subject {
        hosts,
        region: REGION,
        other_region: "eu-west-1",
        image_id: IMAGE,
    }
}

#[tokio::test]
async fn launch_tags_the_machines_and_passes_the_user_data() {
    let handler = hosts();
    let tag = unique("launch");
    let request = subject(&handler).request(&tag, 2);
    let launched = handler.launch(&request).await.expect("launch");
    assert_eq!(launched.len(), 2);
    for host in &launched {
        assert_eq!(host.region, REGION);
        assert_eq!(host.image_id, IMAGE);
        assert_eq!(host.instance_type, "g4dn.xlarge");
        assert_eq!(host.tags, request.tags);
        assert!(host.launched_at.is_some());
    }

    let client = raw_client();
    let described = client
        .describe_instances()
        .set_instance_ids(Some(ids(&launched)))
        .send()
        .await
        .expect("describe");
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances())
        .collect();
    assert_eq!(instances.len(), 2);
    for instance in instances {
        let tags: BTreeMap<String, String> = instance
            .tags()
            .iter()
            .map(|tag| {
                (
                    tag.key().unwrap_or_default().to_owned(),
                    tag.value().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(tags, request.tags);
        assert_eq!(instance.image_id(), Some(IMAGE));
        assert_eq!(
            instance.instance_type().map(|kind| kind.as_str()),
            Some("g4dn.xlarge")
        );
        assert_eq!(instance.client_token(), Some(request.client_token.as_str()));

        let id = instance.instance_id().expect("an id");
        let user_data = client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .expect("describe the user data");
        let encoded = user_data
            .user_data()
            .and_then(|value| value.value())
            .expect("user data");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        assert_eq!(
            String::from_utf8(decoded).expect("utf-8"),
            request.user_data
        );

        let shutdown = client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
            .send()
            .await
            .expect("describe the shutdown behaviour");
        assert_eq!(
            shutdown
                .instance_initiated_shutdown_behavior()
                .and_then(|value| value.value()),
            Some("terminate")
        );
    }

    // The volumes carry the tags too.
    let volumes = client
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{TAG}"))
                .values(&tag)
                .build(),
        )
        .send()
        .await
        .expect("describe volumes");
    assert_eq!(volumes.volumes().len(), 2);
}

// The cases every host handler is held to (the in-memory fake runs the same ones).

#[tokio::test]
async fn a_retried_launch_returns_the_same_machines() {
    let handler = hosts();
    conformance::a_retried_launch_returns_the_same_machines(&subject(&handler)).await;
}

#[tokio::test]
async fn list_shows_only_the_machines_with_the_tag() {
    let handler = hosts();
    conformance::list_shows_only_the_machines_with_the_tag(&subject(&handler)).await;
}

#[tokio::test]
async fn launched_machines_run_then_terminate_and_leave_the_list() {
    let handler = hosts();
    conformance::launched_machines_run_then_terminate_and_stay_listed(&subject(&handler)).await;
}

#[tokio::test]
async fn waiting_for_a_state_that_never_comes_times_out() {
    let handler = hosts();
    conformance::waiting_for_a_state_that_never_comes_times_out(&subject(&handler)).await;
}

#[tokio::test]
async fn waiting_for_a_terminated_machine_to_run_fails_naming_it() {
    let handler = hosts();
    conformance::waiting_for_a_terminated_machine_to_run_fails_naming_it(&subject(&handler)).await;
}

#[tokio::test]
async fn terminating_unknown_or_no_machines_is_fine() {
    let handler = hosts();
    conformance::terminating_unknown_or_no_machines_is_fine(&subject(&handler)).await;
}

#[tokio::test]
async fn describing_by_id_answers_for_every_id() {
    let handler = hosts();
    conformance::describing_by_id_answers_for_every_id(&subject(&handler)).await;
}

#[tokio::test]
async fn waits_on_nothing_return_at_once() {
    let handler = hosts();
    conformance::waits_on_nothing_return_at_once(&subject(&handler)).await;
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_retryably() {
    // A loopback port nobody listens on: a dispatch failure, classified as retryable.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let handler = Ec2Hosts::new(Ec2Options {
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        credentials: Some(("testing".to_owned(), "testing".to_owned())),
        ..Ec2Options::default()
    });
    let error = handler
        .list(REGION, (TAG, "x"))
        .await
        .expect_err("nothing answers");
    assert!(matches!(error, HostError::Failed(_)), "{error}");
}
