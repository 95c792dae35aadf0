//! What every [`HostHandler`] must do, as cases any implementation can be run through: the EC2
//! handler against moto (`tests/moto_ec2.rs`) and [`super::fake::FakeHosts`] in memory. A fake
//! that passes them behaves like the real handler wherever the executor relies on it.
//!
//! Each case tags its machines with a value of its own, so cases sharing one cloud never see
//! each other's machines; each cleans up what it launched where the cloud keeps it running.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{CloudHost, CloudState, HostError, HostHandler, LaunchRequest};

/// The tag key the cases launch with and list by.
pub const TAG: &str = "whist-test";

/// The handler under test and where it may launch.
#[derive(Debug)]
pub struct Subject<'a> {
    pub hosts: &'a dyn HostHandler,
    pub region: &'a str,
    /// A region the cases launch nothing in.
    pub other_region: &'a str,
    pub image_id: &'a str,
}

impl Subject<'_> {
    /// A launch of `count` machines tagged `TAG=tag_value`, with a token of its own.
    pub fn request(&self, tag_value: &str, count: u32) -> LaunchRequest {
        LaunchRequest {
            region: self.region.to_owned(),
            image_id: self.image_id.to_owned(),
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

    async fn launch(&self, tag_value: &str, count: u32) -> Vec<String> {
        ids(&self
            .hosts
            .launch(&self.request(tag_value, count))
            .await
            .expect("launch"))
    }

    async fn list(&self, tag_value: &str) -> Vec<CloudHost> {
        self.hosts
            .list(self.region, (TAG, tag_value))
            .await
            .expect("list")
    }
}

pub fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4())
}

/// Ids, sorted, for comparing sets of machines.
pub fn ids(hosts: &[CloudHost]) -> Vec<String> {
    let mut ids: Vec<String> = hosts.iter().map(|host| host.id.clone()).collect();
    ids.sort();
    ids
}

/// Every case, one after another.
pub async fn all(subject: &Subject<'_>) {
    a_retried_launch_returns_the_same_machines(subject).await;
    list_shows_only_the_machines_with_the_tag(subject).await;
    launched_machines_run_then_terminate_and_stay_listed(subject).await;
    waiting_for_a_state_that_never_comes_times_out(subject).await;
    waiting_for_a_terminated_machine_to_run_fails_naming_it(subject).await;
    terminating_unknown_or_no_machines_is_fine(subject).await;
    describing_by_id_answers_for_every_id(subject).await;
    waits_on_nothing_return_at_once(subject).await;
}

pub async fn a_retried_launch_returns_the_same_machines(subject: &Subject<'_>) {
    let tag = unique("idempotent");
    let request = subject.request(&tag, 2);
    let first = subject.hosts.launch(&request).await.expect("launch");
    let again = subject.hosts.launch(&request).await.expect("launch again");
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(ids(&subject.list(&tag).await), ids(&first));

    // Another token is another launch.
    let other = LaunchRequest {
        client_token: unique("token"),
        count: 1,
        ..request.clone()
    };
    let third = subject.hosts.launch(&other).await.expect("another launch");
    assert_eq!(third.len(), 1);
    assert!(!ids(&first).contains(&third[0].id));
    assert_eq!(subject.list(&tag).await.len(), 3);
}

pub async fn list_shows_only_the_machines_with_the_tag(subject: &Subject<'_>) {
    let ours = unique("ours");
    let theirs = unique("theirs");
    let launched = subject.launch(&ours, 2).await;
    subject.launch(&theirs, 1).await;

    let listed = subject.list(&ours).await;
    assert_eq!(ids(&listed), launched);
    for host in &listed {
        assert_eq!(host.tags.get(TAG), Some(&ours));
        assert!(matches!(
            host.state,
            CloudState::Pending | CloudState::Running
        ));
        assert!(host.launched_at.is_some());
        assert_eq!(host.region, subject.region);
    }
    assert_eq!(subject.list(&unique("nobody")).await.len(), 0);
    // Other regions are other clouds and see none of it.
    let elsewhere = subject
        .hosts
        .list(subject.other_region, (TAG, &ours))
        .await
        .expect("list elsewhere");
    assert_eq!(elsewhere.len(), 0);
}

pub async fn launched_machines_run_then_terminate_and_stay_listed(subject: &Subject<'_>) {
    let (hosts, region) = (subject.hosts, subject.region);
    let tag = unique("lifecycle");
    let launched = subject.launch(&tag, 2).await;
    hosts
        .wait_running(region, &launched, Duration::from_secs(10))
        .await
        .expect("running");
    let listed = subject.list(&tag).await;
    assert!(
        listed.iter().all(|host| host.state == CloudState::Running),
        "{listed:?}"
    );

    hosts.terminate(region, &launched).await.expect("terminate");
    hosts
        .wait_terminated(region, &launched, Duration::from_secs(10))
        .await
        .expect("terminated");
    // Terminated machines stay listed, as terminated, while the cloud still reports them.
    let listed = subject.list(&tag).await;
    assert!(
        listed
            .iter()
            .all(|host| host.state == CloudState::Terminated),
        "{listed:?}"
    );
    // Terminating again is fine.
    hosts
        .terminate(region, &launched)
        .await
        .expect("terminate again");
}

pub async fn waiting_for_a_state_that_never_comes_times_out(subject: &Subject<'_>) {
    let (hosts, region) = (subject.hosts, subject.region);
    let launched = subject.launch(&unique("timeout"), 1).await;
    hosts
        .wait_running(region, &launched, Duration::from_secs(10))
        .await
        .expect("running");
    let started = Instant::now();
    let error = hosts
        .wait_terminated(region, &launched, Duration::from_millis(500))
        .await
        .expect_err("nobody terminated it");
    assert!(matches!(error, HostError::Timeout(..)), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
    hosts.terminate(region, &launched).await.expect("clean up");
}

pub async fn waiting_for_a_terminated_machine_to_run_fails_naming_it(subject: &Subject<'_>) {
    let (hosts, region) = (subject.hosts, subject.region);
    let launched = subject.launch(&unique("gone"), 2).await;
    hosts
        .terminate(region, &launched[..1])
        .await
        .expect("terminate one");
    let error = hosts
        .wait_running(region, &launched, Duration::from_secs(10))
        .await
        .expect_err("one of them is gone");
    assert!(!matches!(error, HostError::Timeout(..)), "{error}");
    assert!(error.to_string().contains(&launched[0]), "{error}");
    hosts.terminate(region, &launched).await.expect("clean up");
}

pub async fn terminating_unknown_or_no_machines_is_fine(subject: &Subject<'_>) {
    let (hosts, region) = (subject.hosts, subject.region);
    hosts.terminate(region, &[]).await.expect("nothing");
    hosts
        .terminate(region, &["i-0123456789abcdef0".to_owned()])
        .await
        .expect("unknown");

    // Unknown ids mixed with real ones: the real ones still go.
    let tag = unique("mixed");
    let mut mixed = subject.launch(&tag, 1).await;
    mixed.push("i-0fedcba9876543210".to_owned());
    hosts.terminate(region, &mixed).await.expect("mixed");
    hosts
        .wait_terminated(region, &mixed, Duration::from_secs(10))
        .await
        .expect("terminated");
    let listed = subject.list(&tag).await;
    assert!(
        listed
            .iter()
            .all(|host| host.state == CloudState::Terminated),
        "{listed:?}"
    );
}

/// Asked by id, the cloud answers for every id: running, terminated, or unknown (EC2's
/// `InvalidInstanceID.NotFound`, which fails a whole call and is then asked id by id).
pub async fn describing_by_id_answers_for_every_id(subject: &Subject<'_>) {
    let (hosts, region) = (subject.hosts, subject.region);
    let launched = subject.launch(&unique("describe"), 2).await;
    hosts
        .terminate(region, &launched[..1])
        .await
        .expect("terminate one");
    let unknown = "i-0aaaaaaaaaaaaaaaa".to_owned();
    let asked = vec![launched[0].clone(), launched[1].clone(), unknown.clone()];
    let described = hosts.describe(region, &asked).await.expect("describe");
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
        hosts
            .describe(region, &[])
            .await
            .expect("nothing")
            .is_empty()
    );
    hosts.terminate(region, &launched).await.expect("clean up");
}

pub async fn waits_on_nothing_return_at_once(subject: &Subject<'_>) {
    let (hosts, region) = (subject.hosts, subject.region);
    hosts
        .wait_running(region, &[], Duration::from_millis(1))
        .await
        .expect("nothing to run");
    hosts
        .wait_terminated(
            region,
            &["i-0123456789abcdef0".to_owned()],
            Duration::from_millis(1),
        )
        .await
        .expect("an unknown machine is as good as terminated");
}
