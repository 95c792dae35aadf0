//! `POST /mandelbox/assign` and the `json_transport` proxy on the real stack: exactly-once claims
//! under concurrency, every refusal code, and every bad request.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{Region, Scaler, assign_body, boxes_on, unique};
use serde_json::json;
use whist_test_support::jwt::TestIssuer;
use whist_types::MandelboxStatus;

async fn scaler(extra: &[&str]) -> Scaler {
    let issuer = Arc::new(TestIssuer::start().await.expect("issuer"));
    // API only: these tests set the fleet up themselves and must not see it scaled.
    let mut args = vec!["--api-only"];
    args.extend_from_slice(extra);
    Scaler::start(issuer, &args).await
}

/// A scaler whose listener has room for 500 requests at once from one address: these tests
/// are about claims, not the listener's limits (which `binary_hostile` covers).
async fn roomy_scaler(extra: &[&str]) -> Scaler {
    let mut args = vec![
        "--max-connections",
        "1000",
        "--max-connections-per-peer",
        "1000",
        "--max-in-flight",
        "1000",
    ];
    args.extend_from_slice(extra);
    scaler(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_requests_for_a_hundred_boxes_give_exactly_a_hundred() {
    let scaler = Arc::new(roomy_scaler(&[]).await);
    let region = Region::create(&scaler.db, 0, true).await;
    let hosts = region
        .active_hosts(&scaler.db, 10, 10, &region.image_id)
        .await;

    let requests: Vec<_> = (0..500)
        .map(|n| {
            let scaler = scaler.clone();
            let body = assign_body(&[&region.name], &region.client_sha);
            tokio::spawn(async move {
                scaler
                    .assign_as(&format!("user-{n}-{}", unique("u")), body)
                    .await
            })
        })
        .collect();
    let mut assigned = Vec::new();
    let mut refused = 0;
    for request in requests {
        let (status, body) = request.await.expect("join");
        match status {
            200 => assigned.push(body["mandelbox_id"].as_str().expect("id").to_owned()),
            503 => {
                assert_eq!(body["error"], "NO_INSTANCE_AVAILABLE", "{body}");
                assert_eq!(body["mandelbox_id"], "00000000-0000-0000-0000-000000000000");
                assert_eq!(body["ip"], "");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(assigned.len(), 100);
    assert_eq!(refused, 400);
    let distinct: HashSet<&String> = assigned.iter().collect();
    assert_eq!(distinct.len(), 100, "no mandelbox given twice");

    let mut allocated = 0;
    for host in &hosts {
        allocated += boxes_on(&scaler.db, host)
            .await
            .iter()
            .filter(|b| b.status == MandelboxStatus::Allocated && b.user_id.is_some())
            .count();
    }
    assert_eq!(allocated, 100);
    let instances = region.instances(&scaler.db).await;
    assert!(
        instances.iter().all(|i| i.remaining_capacity == 0),
        "capacity consistent: {instances:?}"
    );
}

/// The hostile case from the review: 500 requests at once for one user (limit 3) on a replica
/// without a rate limit, with boxes to spare. Three sessions, and every other answer is the
/// true refusal, never `NO_INSTANCE_AVAILABLE` because of the user's own requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_at_once_gets_the_limit_and_every_other_answer_says_so() {
    let scaler = Arc::new(roomy_scaler(&["--assign-burst-per-user", "1000"]).await);
    let region = Region::create(&scaler.db, 0, true).await;
    region
        .active_hosts(&scaler.db, 4, 5, &region.image_id)
        .await;
    let user = unique("hasty");
    let requests: Vec<_> = (0..500)
        .map(|_| {
            let (scaler, user) = (scaler.clone(), user.clone());
            let body = assign_body(&[&region.name], &region.client_sha);
            tokio::spawn(async move { scaler.assign_as(&user, body).await })
        })
        .collect();
    let mut answers: std::collections::HashMap<String, usize> = Default::default();
    for request in requests {
        let (status, body) = request.await.expect("join");
        let answer = match status {
            200 => "assigned".to_owned(),
            _ => format!("{status} {}", body["error"].as_str().unwrap_or_default()),
        };
        *answers.entry(answer).or_default() += 1;
    }
    assert_eq!(answers.get("assigned"), Some(&3), "{answers:?}");
    assert_eq!(
        answers.get("503 USER_ALREADY_ACTIVE"),
        Some(&497),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_codes() {
    let scaler = scaler(&[]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    let disabled = Region::create(&scaler.db, 0, false).await;
    let hosts = region
        .active_hosts(&scaler.db, 1, 2, &region.image_id)
        .await;

    let (status, body) = scaler
        .assign_as(
            "u1",
            assign_body(&[&disabled.name, "nowhere"], &region.client_sha),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("REGION_NOT_ENABLED"))
    );
    let (status, body) = scaler
        .assign_as("u1", assign_body(&[], &region.client_sha))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("REGION_NOT_ENABLED"))
    );

    let (status, body) = scaler
        .assign_as("u1", assign_body(&[&region.name], "some-other-commit"))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("COMMIT_HASH_MISMATCH"))
    );

    // `local_dev` is the region's build only in the local environment; this one is dev.
    let (status, body) = scaler
        .assign_as("u1", assign_body(&[&region.name], "local_dev"))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("COMMIT_HASH_MISMATCH"))
    );

    // Disabled regions are skipped in order.
    let user = unique("user");
    let (status, body) = scaler
        .assign_as(
            &user,
            assign_body(&[&disabled.name, &region.name], &region.client_sha),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ip"], "127.0.0.1");
    assert_eq!(body["error"], "");
    let id = body["mandelbox_id"].as_str().expect("id").to_owned();
    let boxes = boxes_on(&scaler.db, &hosts[0]).await;
    let claimed = boxes
        .iter()
        .find(|b| b.id.to_string() == id)
        .expect("claimed box");
    assert_eq!(
        claimed.user_id.as_deref(),
        Some(user.as_str()),
        "the token's subject is the user"
    );

    // The per-user limit (3, the default) holds.
    region
        .active_hosts(&scaler.db, 1, 12, &region.image_id)
        .await;
    let limited = unique("limited");
    for _ in 0..3 {
        let (status, body) = scaler
            .assign_as(&limited, assign_body(&[&region.name], &region.client_sha))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = scaler
        .assign_as(&limited, assign_body(&[&region.name], &region.client_sha))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("USER_ALREADY_ACTIVE")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fullest_host_is_chosen_first() {
    let scaler = scaler(&[]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    let roomy = region
        .active_hosts(&scaler.db, 1, 12, &region.image_id)
        .await;
    let snug = region
        .active_hosts(&scaler.db, 1, 2, &region.image_id)
        .await;
    let (status, body) = scaler
        .assign_as(
            &unique("u"),
            assign_body(&[&region.name], &region.client_sha),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["mandelbox_id"].as_str().expect("id");
    assert!(
        boxes_on(&scaler.db, &snug[0])
            .await
            .iter()
            .any(|b| b.id.to_string() == id)
    );
    assert!(!roomy.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_a_message() {
    let scaler = scaler(&["--assign-burst-per-user", "2"]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    let url = scaler.url("/mandelbox/assign");
    let http = &scaler.http;

    let response = http.get(&url).send().await.expect("answer");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST, OPTIONS");
    let response = http
        .get(scaler.url("/json_transport"))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "PUT, OPTIONS");
    let response = http
        .request(reqwest::Method::OPTIONS, &url)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 204);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");

    let response = http
        .post(&url)
        .json(&json!({"regions": []}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 401, "no token");
    let response = http
        .post(&url)
        .bearer_auth("not-a-jwt")
        .json(&json!({}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 401);

    for body in [
        "not json",
        r#"{"regions": "us-east-1"}"#,
        r#"{"session_id": "x"}"#,
    ] {
        // Each from its own user: a request counts against its caller's allowance before
        // its body is read.
        let response = http
            .post(&url)
            .bearer_auth(scaler.issuer.token(&unique("bad-body-user")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 400, "{body}");
        let error: serde_json::Value = response.json().await.expect("json");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.contains("malformed")),
            "{error}"
        );
    }

    // The rate limit is per user: a burst of 2, so the next request of the same user waits.
    let user = unique("hasty");
    let body = assign_body(&[&region.name], &region.client_sha);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(scaler.assign_as(&user, body.clone()).await.0);
    }
    assert_eq!(statuses[2], 429, "{statuses:?}");
    let (status, _) = scaler.assign_as(&unique("patient"), body).await;
    assert_ne!(status, 429, "another user is not slowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_transport_reaches_only_the_callers_own_mandelbox() {
    let scaler = scaler(&[]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    region
        .active_hosts(&scaler.db, 1, 2, &region.image_id)
        .await;
    let owner = unique("owner");
    let (status, body) = scaler
        .assign_as(&owner, assign_body(&[&region.name], &region.client_sha))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["mandelbox_id"].as_str().expect("id").to_owned();
    let url = scaler.url("/json_transport");
    let put = |user: String, mandelbox: String| {
        let http = scaler.http.clone();
        let token = scaler.issuer.token(&user);
        let url = url.clone();
        async move {
            http.put(url)
                .bearer_auth(token)
                .json(&json!({"mandelbox_id": mandelbox, "json_data": "{}", "ip": "203.0.113.9"}))
                .send()
                .await
                .expect("answer")
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        put(unique("stranger"), id.clone()).await,
        403,
        "another user's box"
    );
    assert_eq!(
        put(owner.clone(), uuid::Uuid::new_v4().to_string()).await,
        404,
        "unknown box"
    );
    let response = scaler
        .http
        .put(&url)
        .json(&json!({"mandelbox_id": id}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 401);
    // The owner's request goes to the box's host (127.0.0.1:4678 here), never to the `ip` the
    // body names; nothing listens there in this test, so the proxy says the host is unreachable.
    assert_eq!(put(owner, id).await, 502);
}

/// A host whose heartbeat stopped gets no session, whatever free boxes its rows still show; it
/// takes sessions again once it beats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_heartbeat_stopped_gets_no_assignment() {
    let scaler = scaler(&[]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    let hosts = region
        .active_hosts(&scaler.db, 2, 2, &region.image_id)
        .await;
    let (dead, alive) = (&hosts[0], &hosts[1]);
    // An hour without a heartbeat (past the default 90 s of
    // `config.settings.assign_heartbeat_max_age_seconds`); triggers off for this session only.
    whist_test_support::shared()
        .sql(&format!(
            "SET session_replication_role = replica; \
             UPDATE whist.instances SET heartbeat_at = now() - interval '1 hour' WHERE id = '{dead}'"
        ))
        .expect("age the heartbeat");

    for _ in 0..2 {
        let (status, body) = scaler
            .assign_as(
                &unique("user"),
                assign_body(&[&region.name], &region.client_sha),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let on = |host: &String| {
        let db = scaler.db.clone();
        let host = host.clone();
        async move {
            boxes_on(&db, &host)
                .await
                .iter()
                .filter(|mandelbox| mandelbox.user_id.is_some())
                .count()
        }
    };
    assert_eq!(on(alive).await, 2, "both sessions on the live host");
    assert_eq!(on(dead).await, 0, "none on the dead one");
    let (status, body) = scaler
        .assign_as(
            &unique("user"),
            assign_body(&[&region.name], &region.client_sha),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "NO_INSTANCE_AVAILABLE", "{body}");

    scaler
        .db
        .execute(&whist_dbclient::ops::heartbeat(dead))
        .await
        .expect("beat");
    let (status, body) = scaler
        .assign_as(
            &unique("user"),
            assign_body(&[&region.name], &region.client_sha),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(on(dead).await, 1, "beating again, it takes sessions");
}

/// Image rows and instance rows may hold an abbreviation of the commit hosts and clients carry
/// in full: one rule (a prefix or the same) decides at registration and at assignment. An image
/// row that no host's build matches is refused as the configuration error it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abbreviated_image_commit_assigns_and_one_matching_no_host_is_a_clear_refusal() {
    let scaler = scaler(&[]).await;
    let region = Region::create(&scaler.db, 0, true).await;
    // Hosts registered with the full commit (what `register_instance` writes).
    region
        .active_hosts(&scaler.db, 1, 2, &region.image_id)
        .await;
    let full = region.client_sha.clone();
    let abbreviated = &full[..full.len() - 4];
    scaler
        .db
        .execute(&whist_dbclient::ops::set_image(
            "AWS",
            &region.name,
            &region.image_id,
            abbreviated,
        ))
        .await
        .expect("abbreviated image row");
    common::eventually(
        "the abbreviated image row in the fleet view",
        std::time::Duration::from_secs(20),
        || {
            let fleet = scaler.running.as_ref().expect("running").fleet.current();
            let name = region.name.clone();
            let abbreviated = abbreviated.to_owned();
            async move {
                (fleet.images.get(&name).map(|i| i.client_sha.clone()) == Some(abbreviated))
                    .then_some(())
            }
        },
    )
    .await;
    for client in [full.as_str(), abbreviated] {
        let (status, body) = scaler
            .assign_as(&unique("user"), assign_body(&[&region.name], client))
            .await;
        assert_eq!(status, 200, "client {client}: {body}");
    }

    // The image row names a build none of the region's hosts runs.
    scaler
        .db
        .execute(&whist_dbclient::ops::set_image(
            "AWS",
            &region.name,
            &region.image_id,
            "0000000-no-host-runs-this",
        ))
        .await
        .expect("image row");
    common::eventually(
        "the misconfigured image row in the fleet view",
        std::time::Duration::from_secs(20),
        || {
            let fleet = scaler.running.as_ref().expect("running").fleet.current();
            let name = region.name.clone();
            async move {
                fleet
                    .images
                    .get(&name)
                    .is_some_and(|image| image.client_sha == "0000000-no-host-runs-this")
                    .then_some(())
            }
        },
    )
    .await;
    let (status, refused) = scaler
        .assign_as(
            &unique("user"),
            assign_body(&[&region.name], "0000000-no-host-runs-this"),
        )
        .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"], "SERVICE_UNAVAILABLE", "{refused}");
}

/// One body limit for both services: a `json_transport` body is refused (413) by the
/// scaling-service exactly where a host would refuse it, and accepted just below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_is_the_hosts_and_is_enforced_before_anything_else() {
    let scaler = scaler(&[]).await;
    let token = scaler.issuer.token(&unique("user"));
    let limit = whist_service_config::MAX_REQUEST_BODY_BYTES;
    let body = |size: usize| {
        let mut body = format!(
            r#"{{"mandelbox_id":"{}","json_data":""#,
            whist_types::MandelboxId::new_random()
        );
        body.push_str(&"a".repeat(size - body.len() - 2));
        body.push_str(r#""}"#);
        assert_eq!(body.len(), size);
        body
    };
    for (size, refused) in [(limit + 1, true), (3 * 1024 * 1024, false), (limit, false)] {
        let response = scaler
            .http
            .put(scaler.url("/json_transport"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body(size))
            .send()
            .await
            .expect("answer");
        if refused {
            assert_eq!(response.status(), 413, "{size} bytes");
        } else {
            // Read whole, then refused for what it says (no such mandelbox).
            assert_eq!(response.status(), 404, "{size} bytes");
        }
    }
}

/// A failure that is not the caller's says what to do and carries an id for the log line with
/// the details, never the details themselves (addresses, library errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_carry_no_internals() {
    // The issuer's keys are behind a closed loopback port.
    let scaler = scaler(&["--auth-jwks-url", "http://127.0.0.1:9/jwks.json"]).await;
    let response = scaler
        .http
        .post(scaler.url("/mandelbox/assign"))
        .bearer_auth(scaler.issuer.token("someone"))
        .json(&json!({"regions": ["us-east-1"]}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("json");
    let text = body.to_string();
    for internal in ["127.0.0.1", "jwks.json", "tcp", "connect", "error sending"] {
        assert!(!text.contains(internal), "{internal} in {text}");
    }
    assert!(
        body["error_id"].as_str().is_some_and(|id| id.len() == 32),
        "{body}"
    );
}
