//! One retry policy per call, under one deadline per action: a throttling EC2 endpoint (moto
//! behind a loopback proxy answering 503 `RequestLimitExceeded` or `Unavailable`) gets at most
//! the configured attempts, and an action never outlasts its deadline. The executor is driven
//! directly with a real leader term (a lease held in the stack).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::unique;
use scaling_service::algorithm::{Action, ImageRef, LaunchPurpose};
use scaling_service::config::CloudBudget;
use scaling_service::executor::{Executor, Safety};
use scaling_service::fleet::Fleet;
use scaling_service::hosts::ec2::{Ec2Hosts, Ec2Options};
use scaling_service::leader::Term;
use scaling_service::metrics::Metrics;
use whist_dbclient::{Fence, ops};
use whist_test_support::faults::{Ec2FaultProxy, FaultMode, ThrottleError};
use whist_types::Environment;

const REGION: &str = "ap-southeast-2";

/// A term of a lease this test holds for a minute.
async fn term() -> (Term, scaling_service::leader::TermHandle) {
    let db = common::db();
    let name = unique("lease");
    db.execute(&ops::create_lease(&name)).await.expect("lease");
    let lease = db
        .execute(&ops::acquire_lease(&name, "budget-test", 60))
        .await
        .expect("acquire")
        .expect("free");
    Term::until(
        Fence {
            lease: name,
            holder: "budget-test".into(),
            generation: lease.generation,
        },
        tokio::time::Instant::now() + Duration::from_secs(50),
    )
}

fn executor(endpoint: &str, budget: CloudBudget) -> Executor {
    Executor {
        db: common::db(),
        hosts: Arc::new(Ec2Hosts::new(Ec2Options {
            endpoint_url: Some(endpoint.to_owned()),
            credentials: Some(("testing".into(), "testing".into())),
            call_attempts: budget.call_attempts,
            ..Ec2Options::default()
        })),
        environment: Environment::Dev,
        user_data: "#!/bin/sh\n".into(),
        metrics: Arc::new(Metrics::new()),
        safety: Safety::default(),
        cloud: budget,
    }
}

fn launch() -> Vec<Action> {
    vec![Action::Launch {
        image: ImageRef {
            image_id: unique("ami"),
            client_sha: unique("sha"),
        },
        instance_type: common::INSTANCE_TYPE.into(),
        count: 1,
        purpose: LaunchPurpose::Buffer,
    }]
}

fn proxy() -> Ec2FaultProxy {
    Ec2FaultProxy::start(&whist_test_support::moto::shared_moto().endpoint()).expect("proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_call_gets_exactly_its_attempts_once() {
    let (term, _handle) = term().await;
    let proxy = proxy();
    for error in [
        ThrottleError::RequestLimitExceeded,
        ThrottleError::ServiceUnavailable,
    ] {
        proxy.set_mode(FaultMode::Throttle {
            actions: None,
            error,
        });
        proxy.reset_counts();
        let executor = executor(
            &proxy.endpoint(),
            CloudBudget {
                action_deadline: Duration::from_secs(30),
                call_attempts: 3,
            },
        );
        let started = Instant::now();
        let outcome = executor
            .run(&term, REGION, launch(), &Fleet::default())
            .await;
        assert_eq!(outcome.errors, 1, "{error:?}");
        assert!(outcome.launched.is_empty());
        // The launch's first call (the look-up of its token) fails three times; the launch
        // stops there, with no second layer of retries around it.
        assert_eq!(proxy.total_calls(), 3, "{error:?}");
        assert_eq!(proxy.calls("RunInstances"), 0);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_throttled_call_is_retried() {
    let (term, _handle) = term().await;
    let proxy = proxy();
    proxy.set_mode(FaultMode::Throttle {
        actions: Some(vec!["RunInstances".into()]),
        error: ThrottleError::RequestLimitExceeded,
    });
    let executor = executor(
        &proxy.endpoint(),
        CloudBudget {
            action_deadline: Duration::from_secs(30),
            call_attempts: 4,
        },
    );
    let outcome = executor
        .run(&term, REGION, launch(), &Fleet::default())
        .await;
    assert_eq!(outcome.errors, 1);
    assert_eq!(proxy.calls("DescribeInstances"), 1);
    assert_eq!(proxy.calls("RunInstances"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_never_outlasts_its_deadline() {
    let (term, _handle) = term().await;
    let proxy = proxy();
    let deadline = Duration::from_secs(2);
    let executor = executor(
        &proxy.endpoint(),
        CloudBudget {
            action_deadline: deadline,
            call_attempts: 1000,
        },
    );
    // moto builds a region's EC2 model on its first request there, which on a slow machine
    // takes longer than the deadline: done here, so the launch below measures the deadline
    // and not moto's start.
    executor
        .hosts
        .list(REGION, ("whist:warm-up", "none"))
        .await
        .expect("moto answers");
    proxy.set_mode(FaultMode::Throttle {
        actions: None,
        error: ThrottleError::RequestLimitExceeded,
    });
    let started = Instant::now();
    let outcome = executor
        .run(&term, REGION, launch(), &Fleet::default())
        .await;
    let took = started.elapsed();
    eprintln!(
        "throttled action: {} calls in {took:?} under a {deadline:?} deadline",
        proxy.total_calls()
    );
    assert_eq!(outcome.errors, 1);
    // The deadline, plus the database's lease check before the call.
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(2),
        "{took:?}"
    );
    assert!(proxy.total_calls() < 1000, "{}", proxy.total_calls());

    // A throttling that ends lets the next action through.
    proxy.set_mode(FaultMode::PassThrough);
    let outcome = executor
        .run(&term, REGION, launch(), &Fleet::default())
        .await;
    assert_eq!(outcome.errors, 0);
    assert_eq!(outcome.launched.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_term_makes_no_cloud_call() {
    let (term, handle) = term().await;
    let proxy = proxy();
    let executor = executor(&proxy.endpoint(), CloudBudget::default());
    handle.end();
    let outcome = executor
        .run(&term, REGION, launch(), &Fleet::default())
        .await;
    assert!(outcome.launched.is_empty());
    assert_eq!(proxy.total_calls(), 0);
}
