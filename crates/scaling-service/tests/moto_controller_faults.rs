//! The controller under faults of its own: a region whose task panics frees only itself, and
//! keeps being retried at a capped pace, while another region's action in flight is never
//! started twice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Scaler, eventually, unique};
use futures::future::BoxFuture;
use scaling_service::hosts::{CloudHost, Described, HostError, HostHandler, LaunchRequest};
use whist_dbclient::ops;
use whist_test_support::faults::{Ec2FaultProxy, FaultMode};
use whist_test_support::jwt::TestIssuer;

/// A cloud whose launches panic in one region (a bug in a handler, say) and go to moto
/// otherwise.
#[derive(Debug)]
struct PanicsIn {
    region: String,
    inner: Arc<dyn HostHandler>,
    panics: AtomicUsize,
}

impl HostHandler for PanicsIn {
    fn launch<'a>(
        &'a self,
        request: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        if request.region == self.region {
            self.panics.fetch_add(1, Ordering::SeqCst);
            panic!("a handler bug in {}", self.region);
        }
        self.inner.launch(request)
    }

    fn terminate<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.inner.terminate(region, ids)
    }

    fn wait_running<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.inner.wait_running(region, ids, timeout)
    }

    fn wait_terminated<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), HostError>> {
        self.inner.wait_terminated(region, ids, timeout)
    }

    fn list<'a>(
        &'a self,
        region: &'a str,
        tag: (&'a str, &'a str),
    ) -> BoxFuture<'a, Result<Vec<CloudHost>, HostError>> {
        self.inner.list(region, tag)
    }

    fn describe<'a>(
        &'a self,
        region: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Described, HostError>> {
        self.inner.describe(region, ids)
    }
}

async fn fresh_region(db: &whist_dbclient::HasuraClient, name: &str, desired: i32) {
    common::clean_region(name);
    common::configure_region(db, name, desired).await;
    db.execute(&ops::set_image("AWS", name, &unique("ami"), &unique("sha")))
        .await
        .expect("image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_region_task_frees_only_its_own_region() {
    let (bad, good) = ("ap-northeast-2", "ap-northeast-3");
    let db = common::db();
    fresh_region(&db, bad, 2).await;
    fresh_region(&db, good, 2).await;
    // The good region's launch stays in flight for a while, across the bad region's panics.
    let proxy =
        Ec2FaultProxy::start(&whist_test_support::moto::shared_moto().endpoint()).expect("proxy");
    proxy.set_mode(FaultMode::DelayActions {
        actions: vec!["RunInstances".into()],
        delay: Duration::from_secs(4),
    });
    let hosts = Arc::new(PanicsIn {
        region: bad.to_owned(),
        inner: common::ec2_at(&proxy.endpoint()),
        panics: AtomicUsize::new(0),
    });
    let issuer = Arc::new(TestIssuer::start().await.expect("issuer"));
    let scaler = Scaler::scaling_with(
        issuer,
        &[bad, good],
        &unique("lease"),
        "solo",
        Some(hosts.clone()),
        &[],
    )
    .await;
    eventually(
        "the good region's host",
        Duration::from_secs(60),
        || async {
            let rows = db
                .execute(&ops::instances_in_region(good))
                .await
                .expect("rows");
            (!rows.is_empty()).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        proxy.calls("RunInstances"),
        1,
        "the good region's launch was never started twice"
    );
    let rows = db
        .execute(&ops::instances_in_region(good))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    // The bad region is retried, at the failure backoff's pace, not stuck and not hammered.
    let panics = hosts.panics.load(Ordering::SeqCst);
    assert!((2..=8).contains(&panics), "{panics} panics");
    assert!(scaler.is_leader(), "the controller survived");
}
