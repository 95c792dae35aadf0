//! The service binary end to end: killed outright with live containers, it restarts, adopts what
//! is still alive, leaks nothing, and exits 0 after a SIGTERM drain.

mod common;

use std::time::Duration;

use common::{Host, HostOptions, ServiceProcess, end_session, eventually, free_port};
use nix::sys::signal::Signal;
use whist_types::MandelboxStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_adopts_its_live_session_and_zygotes_on_restart() {
    let mut host = Host::prepare(HostOptions::default()).await;
    let (port, ops_port) = (free_port(), free_port());
    host.options.extra_args = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--ops-listen".into(),
        format!("127.0.0.1:{ops_port}"),
    ];
    host.use_binary_at(port, ops_port);
    let args = host.args();

    let first = ServiceProcess::spawn(&args);
    host.wait_for_zygotes(2).await;
    let user = common::unique("user");
    let (session, ports) = host.start_session(&user).await;
    host.wait_for_boxes(1, 1).await;
    let before: Vec<String> = host.containers().await.into_iter().map(|c| c.id).collect();

    // No drain, no cleanup: the process is gone and its containers live on.
    first.signal(Signal::SIGKILL);
    assert_eq!(
        first.wait(Duration::from_secs(10)).await,
        None,
        "killed by a signal"
    );
    assert_eq!(host.containers().await.len(), 2);

    let second = ServiceProcess::spawn(&args);
    eventually(
        "the restarted service to be ready",
        Duration::from_secs(30),
        || async {
            let ready = reqwest::get(format!("http://127.0.0.1:{ops_port}/readyz")).await;
            ready.is_ok_and(|r| r.status() == 200).then_some(())
        },
    )
    .await;
    host.wait_for_boxes(1, 1).await;
    let after: Vec<String> = host.containers().await.into_iter().map(|c| c.id).collect();
    let mut sorted_before = before.clone();
    sorted_before.sort();
    let mut sorted_after = after.clone();
    sorted_after.sort();
    assert_eq!(
        sorted_before, sorted_after,
        "the same containers, adopted, none added"
    );
    let row = host
        .rows()
        .await
        .into_iter()
        .find(|row| row.id == session)
        .expect("row");
    assert_eq!(row.status, MandelboxStatus::Running);
    let (status, _) = host.transport(session, &user).await;
    assert_eq!(
        status, 409,
        "the adopted session already has its configuration"
    );

    // The adopted session ends like any other.
    end_session(&ports);
    host.wait_for_row_gone(session).await;
    host.wait_for_zygotes(2).await;
    assert_eq!(host.instance().await.expect("row").remaining_capacity, 2);

    second.signal(Signal::SIGTERM);
    assert_eq!(second.wait(Duration::from_secs(60)).await, Some(0));
    assert!(host.instance().await.is_none());
    assert!(host.containers().await.is_empty());
}

/// Runs the binary with `args` and no environment variables of its own; its exit code and
/// everything it printed.
fn run_binary(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_host-service"))
        .args(args)
        .env_remove("APP_ENV")
        .env_remove("WHIST_AUTH_ISSUER")
        .env_remove("WHIST_LISTEN")
        .env("HASURA_URL", "http://127.0.0.1:9/v1/graphql")
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_2_with_a_message() {
    let (code, text) = run_binary(&["--environment", "prod"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--auth-issuer"), "{text}");
}

/// A forgotten environment never starts a service in some default mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_environment_it_refuses_to_start() {
    let (code, text) = run_binary(&["--local", "--instance-id", "i-1"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--environment"), "{text}");
}

/// Without tokens, `json_transport` may listen on loopback only, whatever else is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_without_an_issuer_off_loopback_refuses_to_start() {
    for listen in ["0.0.0.0:4678", "192.0.2.10:4678"] {
        let (code, text) = run_binary(&[
            "--environment",
            "local",
            "--local",
            "--instance-id",
            "i-1",
            "--listen",
            listen,
        ]);
        assert_eq!(code, Some(2), "{listen}: {text}");
        assert!(
            text.contains("--auth-issuer") && text.contains(&format!("--listen is {listen}")),
            "{text}"
        );
    }
    // `--local` (where the identity comes from) never turns tokens off outside `local`.
    let (code, text) = run_binary(&[
        "--environment",
        "dev",
        "--local",
        "--instance-id",
        "i-1",
        "--listen",
        "127.0.0.1:4678",
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--auth-issuer"), "{text}");
}
