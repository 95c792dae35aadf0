//! The EC2 host handler against moto on loopback: launches, idempotency, listing, waits and
//! terminations. Every test tags its machines with its own value, so tests sharing the server
//! never see each other's machines. Nothing here reaches the real AWS: the clients get moto's
//! endpoint and static credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use base64::Engine as _;
use scaling_service::hosts::ec2::{Ec2Hosts, Ec2Options};
use scaling_service::hosts::{CloudState, HostError, HostHandler, LaunchRequest};
use whist_test_support::shared_moto;

const REGION: &str = "us-east-1";
/// One of the images moto knows from the start (it accepts unknown ones too).
const IMAGE: &str = "ami-12c6146b";
const TAG: &str = "whist-test";

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

fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4())
}

fn request(tag_value: &str, count: u32) -> LaunchRequest {
    LaunchRequest {
        region: REGION.to_owned(),
        image_id: IMAGE.to_owned(),
        instance_type: "g4dn.xlarge".to_owned(),
        count,
        client_token: unique("token"),
        user_data: "#!/bin/sh\necho hello from the test\n".to_owned(),
        tags: BTreeMap::from([
            (TAG.to_owned(), tag_value.to_owned()),
            ("Name".to_owned(), "whist-host".to_owned()),
        ]),
    }
}

fn ids(hosts: &[scaling_service::hosts::CloudHost]) -> Vec<String> {
    let mut ids: Vec<String> = hosts.iter().map(|host| host.id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn launch_tags_the_machines_and_passes_the_user_data() {
    let handler = hosts();
    let tag = unique("launch");
    let request = request(&tag, 2);
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

#[tokio::test]
async fn a_retried_launch_returns_the_same_machines() {
    let handler = hosts();
    let tag = unique("idempotent");
    let request = request(&tag, 2);
    let first = handler.launch(&request).await.expect("launch");
    let again = handler.launch(&request).await.expect("launch again");
    assert_eq!(ids(&first), ids(&again));
    let listed = handler.list(REGION, (TAG, &tag)).await.expect("list");
    assert_eq!(ids(&listed), ids(&first));

    // Another token is another launch.
    let other = LaunchRequest {
        client_token: unique("token"),
        count: 1,
        ..request.clone()
    };
    let third = handler.launch(&other).await.expect("another launch");
    assert_eq!(third.len(), 1);
    assert!(!ids(&first).contains(&third[0].id));
    let listed = handler.list(REGION, (TAG, &tag)).await.expect("list");
    assert_eq!(listed.len(), 3);
}

#[tokio::test]
async fn list_shows_only_the_machines_with_the_tag() {
    let handler = hosts();
    let ours = unique("ours");
    let theirs = unique("theirs");
    let launched = handler
        .launch(&request(&ours, 2))
        .await
        .expect("launch ours");
    handler
        .launch(&request(&theirs, 1))
        .await
        .expect("launch theirs");

    let listed = handler.list(REGION, (TAG, &ours)).await.expect("list");
    assert_eq!(ids(&listed), ids(&launched));
    for host in &listed {
        assert_eq!(host.tags.get(TAG), Some(&ours));
        assert!(matches!(
            host.state,
            CloudState::Pending | CloudState::Running
        ));
        assert!(host.launched_at.is_some());
        assert_eq!(host.region, REGION);
    }
    assert_eq!(
        handler
            .list(REGION, (TAG, &unique("nobody")))
            .await
            .expect("list nothing")
            .len(),
        0
    );
    // Other regions are other clients and see none of it.
    assert_eq!(
        handler
            .list("eu-west-1", (TAG, &ours))
            .await
            .expect("list elsewhere")
            .len(),
        0
    );
}

#[tokio::test]
async fn launched_machines_run_then_terminate_and_leave_the_list() {
    let handler = hosts();
    let tag = unique("lifecycle");
    let launched = handler.launch(&request(&tag, 2)).await.expect("launch");
    let launched = ids(&launched);
    handler
        .wait_running(REGION, &launched, Duration::from_secs(10))
        .await
        .expect("running");
    let listed = handler.list(REGION, (TAG, &tag)).await.expect("list");
    assert!(
        listed.iter().all(|host| host.state == CloudState::Running),
        "{listed:?}"
    );

    handler
        .terminate(REGION, &launched)
        .await
        .expect("terminate");
    handler
        .wait_terminated(REGION, &launched, Duration::from_secs(10))
        .await
        .expect("terminated");
    // Terminated machines stay listed, as terminated, while the cloud still reports them.
    let listed = handler.list(REGION, (TAG, &tag)).await.expect("list");
    assert!(
        listed
            .iter()
            .all(|host| host.state == CloudState::Terminated),
        "{listed:?}"
    );
    // Terminating again is fine.
    handler
        .terminate(REGION, &launched)
        .await
        .expect("terminate again");
}

#[tokio::test]
async fn waiting_for_a_state_that_never_comes_times_out() {
    let handler = hosts();
    let tag = unique("timeout");
    let launched = ids(&handler.launch(&request(&tag, 1)).await.expect("launch"));
    handler
        .wait_running(REGION, &launched, Duration::from_secs(10))
        .await
        .expect("running");
    let started = std::time::Instant::now();
    let error = handler
        .wait_terminated(REGION, &launched, Duration::from_millis(500))
        .await
        .expect_err("nobody terminated it");
    assert!(matches!(error, HostError::Timeout(..)), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
    handler
        .terminate(REGION, &launched)
        .await
        .expect("clean up");
}

#[tokio::test]
async fn waiting_for_a_terminated_machine_to_run_fails_naming_it() {
    let handler = hosts();
    let tag = unique("gone");
    let launched = ids(&handler.launch(&request(&tag, 2)).await.expect("launch"));
    handler
        .terminate(REGION, &launched[..1])
        .await
        .expect("terminate one");
    let error = handler
        .wait_running(REGION, &launched, Duration::from_secs(10))
        .await
        .expect_err("one of them is gone");
    assert!(!matches!(error, HostError::Timeout(..)), "{error}");
    assert!(error.to_string().contains(&launched[0]), "{error}");
}

#[tokio::test]
async fn terminating_unknown_or_no_machines_is_fine() {
    let handler = hosts();
    handler.terminate(REGION, &[]).await.expect("nothing");
    handler
        .terminate(REGION, &["i-0123456789abcdef0".to_owned()])
        .await
        .expect("unknown");

    // Unknown ids mixed with real ones: the real ones still go.
    let tag = unique("mixed");
    let launched = ids(&handler.launch(&request(&tag, 1)).await.expect("launch"));
    let mut mixed = launched.clone();
    mixed.push("i-0fedcba9876543210".to_owned());
    handler.terminate(REGION, &mixed).await.expect("mixed");
    handler
        .wait_terminated(REGION, &mixed, Duration::from_secs(10))
        .await
        .expect("terminated");
    let listed = handler.list(REGION, (TAG, &tag)).await.expect("list");
    assert!(
        listed
            .iter()
            .all(|host| host.state == CloudState::Terminated),
        "{listed:?}"
    );
}

/// Asked by id, the cloud answers for every id: running, terminated, or unknown (EC2's
/// `InvalidInstanceID.NotFound`, which fails a whole call and is then asked id by id).
#[tokio::test]
async fn describing_by_id_answers_for_every_id() {
    let handler = hosts();
    let tag = unique("describe");
    let launched = ids(&handler.launch(&request(&tag, 2)).await.expect("launch"));
    handler
        .terminate(REGION, &launched[..1])
        .await
        .expect("terminate one");
    let unknown = "i-0aaaaaaaaaaaaaaaa".to_owned();
    let asked = vec![launched[0].clone(), launched[1].clone(), unknown.clone()];
    let described = handler.describe(REGION, &asked).await.expect("describe");
    assert_eq!(described.len(), 3, "{described:?}");
    assert_eq!(
        described[&launched[0]].as_ref().map(|host| host.state),
        Some(CloudState::Terminated)
    );
    assert!(matches!(
        described[&launched[1]].as_ref().map(|host| host.state),
        Some(CloudState::Running | CloudState::Pending)
    ));
    assert_eq!(described[&unknown], None, "unknown to the cloud");
    assert!(
        handler
            .describe(REGION, &[])
            .await
            .expect("nothing")
            .is_empty()
    );
    handler
        .terminate(REGION, &launched)
        .await
        .expect("clean up");
}

#[tokio::test]
async fn waits_on_nothing_return_at_once() {
    let handler = hosts();
    handler
        .wait_running(REGION, &[], Duration::from_millis(1))
        .await
        .expect("nothing to run");
    handler
        .wait_terminated(
            REGION,
            &["i-0123456789abcdef0".to_owned()],
            Duration::from_millis(1),
        )
        .await
        .expect("an unknown machine is as good as terminated");
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
