//! Every way a `json_transport` can be wrong gets its own answer, and none of them disturbs the
//! other sessions on the host or the process.

mod common;

use common::{Host, HostOptions, box_request};
use serde_json::json;
use whist_types::{MandelboxId, MandelboxStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_answers_and_leave_sessions_alone() {
    let mut host = Host::start(HostOptions {
        capacity: 3,
        // Room in the owner's allowance for every bad request below.
        extra_args: ["--drain-deadline", "1", "--transport-burst-per-user", "50"]
            .map(String::from)
            .to_vec(),
        ..HostOptions::default()
    })
    .await;
    let owner = common::unique("owner");
    let (running, ports) = host.start_session(&owner).await;
    let claimed = host.claim(&owner).await;
    host.wait_for_status(claimed, MandelboxStatus::Connecting)
        .await;
    let body =
        |id: MandelboxId| json!({ "mandelbox_id": id.to_string(), "json_data": "{}" }).to_string();
    let token = host.issuer.token(&owner);

    // 401: no token, a malformed header, a forged or expired token.
    let (status, reply) = host.transport_raw(None, body(claimed)).await;
    assert_eq!(status, 401, "{reply}");
    assert!(reply["error"].is_string());
    let (status, _) = host.transport_raw(Some("undefined"), body(claimed)).await;
    assert_eq!(status, 401);
    let mut expired = host.issuer.claims(&owner);
    expired["exp"] = json!(1_000_000_000);
    let (status, _) = host
        .transport_raw(Some(&host.issuer.token_with(&expired, None)), body(claimed))
        .await;
    assert_eq!(status, 401);
    let (status, _) = host
        .transport_raw(
            Some(&host.issuer.hs256_token(&host.issuer.claims(&owner))),
            body(claimed),
        )
        .await;
    assert_eq!(status, 401);

    // 400: not JSON, no id, no json_data (the API requires it), an id that is not a UUID,
    // json_data that is neither form.
    for bad in [
        "not json".to_owned(),
        json!({ "json_data": "{}" }).to_string(),
        json!({ "mandelbox_id": claimed.to_string() }).to_string(),
        json!({ "mandelbox_id": "nope", "json_data": "{}" }).to_string(),
        json!({ "mandelbox_id": claimed.to_string(), "json_data": "%%%" }).to_string(),
    ] {
        let (status, reply) = host.transport_raw(Some(&token), bad.clone()).await;
        assert_eq!(status, 400, "{bad} → {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    // 404: a mandelbox this host does not have.
    let (status, _) = host
        .transport_raw(Some(&token), body(MandelboxId::new_random()))
        .await;
    assert_eq!(status, 404);

    // 403: another user's token, and a zygote nobody was assigned.
    let stranger = host.issuer.token(&common::unique("stranger"));
    let (status, _) = host.transport_raw(Some(&stranger), body(claimed)).await;
    assert_eq!(status, 403);
    let zygote = host
        .rows()
        .await
        .into_iter()
        .find(|row| row.status == MandelboxStatus::Waiting)
        .expect("a zygote")
        .id;
    let (status, _) = host.transport_raw(Some(&token), body(zygote)).await;
    assert_eq!(status, 403);

    // 409: a second json_transport for a running session.
    let (status, reply) = host.transport_raw(Some(&token), body(running)).await;
    assert_eq!(status, 409, "{reply}");

    // 405 for another method, 204 for a CORS preflight.
    let url = format!(
        "https://127.0.0.1:{}/json_transport",
        host.transport_addr.expect("started").port()
    );
    let http = host.http.clone().expect("client");
    let response = http.post(&url).send().await.expect("answer");
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "PUT, OPTIONS");

    // One body limit with the scaling-service: past it, 413 before anything is read.
    let oversized = "a".repeat(whist_service_config::MAX_REQUEST_BODY_BYTES + 1);
    let response = http
        .put(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(oversized)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 413);
    let response = http
        .request(reqwest::Method::OPTIONS, &url)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 204);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");

    // After all that, the owner still gets the claimed box, and the running session still runs.
    let (status, reply) = host.transport(claimed, &owner).await;
    assert_eq!(status, 200, "{reply}");
    let reply = box_request(ports.port_32262, "status").expect("session alive");
    assert!(reply.contains("state=ready"));
    let rows = host.rows().await;
    assert!(
        rows.iter()
            .any(|row| row.id == running && row.status == MandelboxStatus::Running)
    );

    let (status, metrics) = host.get_ops("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("json_transport_requests_total{status=\"401\"} 4"),
        "{metrics}"
    );
    assert_eq!(
        host.running.as_ref().map(|r| r.agent.status().draining),
        Some(false)
    );
    assert_eq!(host.stop().await, host_service::Exit::DrainForced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_that_never_gets_ready_is_answered_504_and_replaced() {
    let mut host = Host::start(HostOptions {
        capacity: 1,
        extra_args: vec!["--ready-timeout".into(), "1".into()],
        ..HostOptions::default()
    })
    .await;
    let user = common::unique("user");
    let id = host.claim(&user).await;
    host.wait_for_status(id, MandelboxStatus::Connecting).await;
    // The reference box holds its readiness back when its configuration asks it to.
    let body = json!({
        "mandelbox_id": id.to_string(),
        "json_data": r#"{"reference_hold_readiness":true}"#,
    });
    let token = host.issuer.token(&user);
    let (status, reply) = host.transport_raw(Some(&token), body.to_string()).await;
    assert_eq!(status, 504, "{reply}");
    host.wait_for_row_gone(id).await;
    host.wait_for_zygotes(1).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 1);
    assert_eq!(host.stop().await, host_service::Exit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_sent_right_after_the_claim_succeeds() {
    // Claim and call at once, as a client does: whichever of the live query and the request
    // reaches the host first, the session starts (the host reads the row itself if needed).
    let mut host = Host::start(HostOptions {
        capacity: 1,
        extra_args: vec!["--drain-deadline".into(), "1".into()],
        ..HostOptions::default()
    })
    .await;
    let user = common::unique("user");
    let id = host.claim(&user).await;
    let (status, reply) = host.transport(id, &user).await;
    assert_eq!(status, 200, "{reply}");
    host.wait_for_status(id, MandelboxStatus::Running).await;
    assert_eq!(host.stop().await, host_service::Exit::DrainForced);
}
