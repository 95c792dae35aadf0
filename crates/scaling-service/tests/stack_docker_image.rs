//! The scaling-service container image (what Heroku runs): built here from a static binary on an
//! empty base, it starts on the port `PORT` names, answers `/healthz`, and assigns a session
//! from the local stack.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Region, assign_body, db};
use serde_json::Value;
use whist_test_support::{repo_root, shared};

/// What `make test` builds before the tests run (`TEST_IMAGE` in the Makefile).
const IMAGE: &str = "whist/scaling-service:test";

fn build_image() -> String {
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/build-scaling-image.sh"))
        .arg(IMAGE)
        .env("WHIST_IMAGE_PROFILE", "dev")
        .output()
        .expect("run the image build script");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "image build failed:\n{stderr}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .expect("the script prints the image name")
        .to_owned()
}

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().expect("docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// The lines from `# --- runtime ---` on, without the line that says where the files come from.
fn runtime_stage(dockerfile: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(dockerfile)).expect("read Dockerfile");
    let (_, runtime) = text
        .split_once("# --- runtime ---")
        .unwrap_or_else(|| panic!("{dockerfile} has no runtime stage marker"));
    runtime
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("COPY "))
        .map(str::to_owned)
        .collect()
}

/// Polls `check` for up to 30 s; `None` when it never succeeded.
async fn poll<T, F, Fut>(mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Some(value) = check().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[test]
fn heroku_and_local_builds_declare_the_same_runtime() {
    let heroku = runtime_stage("Dockerfile");
    assert_eq!(heroku, runtime_stage("deploy/heroku/prebuilt.Dockerfile"));
    assert!(
        heroku.iter().any(|line| line == "FROM scratch"),
        "{heroku:?}"
    );
    let heroku_yml = std::fs::read_to_string(repo_root().join("heroku.yml")).expect("heroku.yml");
    assert!(heroku_yml.contains("web: Dockerfile"), "{heroku_yml}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_health_and_assign_against_the_local_stack() {
    let image = build_image();
    let inspect = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}} {{json .Config.Cmd}}",
        &image,
    ]);
    assert_eq!(inspect, r#"65534:65534 ["/scaling-service"]"#);

    let db = db();
    let region = Region::create(&db, 0, true).await;
    let hosts = region.active_hosts(&db, 1, 1, &region.image_id).await;
    let boxes = common::boxes_on(&db, &hosts[0]).await;

    let stack = shared();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    // Host networking reaches the stack on loopback. API-only: this replica never scales, so it
    // never calls a cloud; the EC2 endpoint points at a closed loopback port all the same.
    let id = docker(&[
        "run",
        "-d",
        "--network",
        "host",
        "-e",
        &format!("PORT={port}"),
        "-e",
        "APP_ENV=local",
        // Without a token issuer, the local environment serves on loopback only.
        "-e",
        "WHIST_LISTEN=127.0.0.1:7730",
        "-e",
        &format!("HASURA_URL={}", stack.graphql_url),
        "-e",
        &format!("HASURA_WEBSOCKET_URL={}", stack.websocket_url),
        "-e",
        &format!("HASURA_ADMIN_SECRET={}", stack.admin_secret),
        "-e",
        "WHIST_API_ONLY=true",
        "-e",
        "WHIST_EC2_ENDPOINT=http://127.0.0.1:9",
        "-e",
        "AWS_EC2_METADATA_DISABLED=true",
        &image,
    ]);
    let _container = Container(id.clone());

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let base = format!("http://127.0.0.1:{port}");
    let healthy = poll(|| {
        let http = http.clone();
        let url = format!("{base}/healthz");
        async move {
            let response = http.get(url).send().await.ok()?;
            response.status().is_success().then_some(())
        }
    })
    .await;
    assert!(
        healthy.is_some(),
        "/healthz never answered; logs:\n{}",
        docker(&["logs", &id])
    );

    let mut body = assign_body(&[&region.name], &region.client_sha);
    body["user_id"] = "image-test-user".into();
    // The fleet view fills from live queries just after start: retry until it has the box.
    let reply: Value = poll(|| {
        let http = http.clone();
        let url = format!("{base}/mandelbox/assign");
        let body = body.clone();
        async move {
            let response = http.post(url).json(&body).send().await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            response.json::<Value>().await.ok()
        }
    })
    .await
    .unwrap_or_else(|| panic!("assign never succeeded; logs:\n{}", docker(&["logs", &id])));
    assert_eq!(reply["mandelbox_id"], boxes[0].id.to_string());
    assert_eq!(reply["ip"], "127.0.0.1");
}
