//! `make run`, as a newcomer runs it: started in the background, it reaches "ready" with a WAITING
//! mandelbox running as a container; the client command plays a whole session against it and the
//! status command shows it; Ctrl-C (SIGINT to the terminal's process group) leaves no process,
//! container or file behind.
//!
//! The fleet gets ports and host addresses of its own, so a developer's `make run` can keep
//! running beside the tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use whist_test_support::foreground::ForegroundJob;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn binary(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_local-fleet"))
        .with_file_name(name)
        .to_path_buf()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// `make run` as a terminal runs it, with this test's ports and host addresses.
fn make_run(fleet_args: &str) -> ForegroundJob {
    let mut command = Command::new("make");
    command
        .args(["--no-print-directory", "run"])
        .arg(format!("FLEET_ARGS={fleet_args}"))
        .current_dir(repo_root());
    ForegroundJob::start(command).expect("start make run")
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {}: {error}", program.display()))
}

fn docker_ps(filter: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--format",
            "{{.ID}} {{.State}}",
            "--filter",
            filter,
        ])
        .output()
        .expect("docker ps");
    assert!(output.status.success(), "docker ps failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Processes whose command line mentions `needle` (from /proc, so no tool is needed).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

#[test]
fn make_run_serves_a_whole_session_and_ctrl_c_leaves_nothing_behind() {
    let api_port = free_port();
    let graphql_port = free_port();
    let scaling_url = format!("http://127.0.0.1:{api_port}");
    let hasura_url = format!("http://127.0.0.1:{graphql_port}/v1/graphql");
    let mut fleet = make_run(&format!(
        "--listen 127.0.0.1:{api_port} --graphql-port {graphql_port} --first-host-address 127.0.9.1"
    ));

    fleet
        .wait_for_line("local fleet ready", Duration::from_secs(150))
        .expect("ready");
    fleet
        .wait_for_line("press Ctrl-C", Duration::from_secs(10))
        .expect("the endpoints");
    let dir = PathBuf::from(fleet.field("files and logs").expect("the files line"));
    let host = fleet.field("host").expect("a host line");
    assert!(
        dir.is_dir(),
        "{} exists while the fleet runs",
        dir.display()
    );
    let containers = docker_ps(&format!("label=whist.instance-id={host}"));
    assert!(
        containers.iter().any(|line| line.ends_with(" running")),
        "a mandelbox of {host} runs as a container: {containers:?}"
    );

    let whist = binary("whist");
    let session = run(
        &whist,
        &[
            "session",
            "--scaling-url",
            &scaling_url,
            "--user",
            "make-run-test",
        ],
    );
    let out = String::from_utf8_lossy(&session.stdout);
    assert!(
        session.status.success(),
        "whist session: {out}\n{}",
        String::from_utf8_lossy(&session.stderr)
    );
    for expected in [
        "mandelbox ",
        "ports ",
        "32262/tcp → ",
        "aes key ",
        "session ended",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }

    let status = run(&whist, &["status", "--hasura-url", &hasura_url]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "whist status: {out}");
    assert!(out.contains("region us-east-1: enabled"), "{out}");
    assert!(
        out.contains(&format!("host {host} ACTIVE 127.0.9.1")),
        "{out}"
    );

    fleet.interrupt().expect("Ctrl-C");
    fleet.wait(Duration::from_secs(90)).expect("make run ends");
    let stopped = fleet
        .wait_for_line("stopped:", Duration::from_secs(5))
        .expect("the stop report");
    assert!(stopped.contains(" 0 container(s) left"), "{stopped}");

    assert!(!dir.exists(), "{} was removed", dir.display());
    // "stopped: N host(s) shut down (local-a, local-b), M container(s) left, files removed"
    let launched: Vec<&str> = stopped
        .split_once("shut down (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(ids, _)| ids.split(", ").collect())
        .unwrap_or_default();
    assert!(launched.contains(&host.as_str()), "{stopped}");
    for instance in launched {
        assert!(
            docker_ps(&format!("label=whist.instance-id={instance}")).is_empty(),
            "no container of {instance} is left"
        );
    }
    assert!(
        processes_mentioning(&dir.to_string_lossy()).is_empty(),
        "no host-service process is left: {:?}",
        processes_mentioning(&dir.to_string_lossy())
    );
    assert!(
        processes_mentioning(&format!("PGRST_SERVER_PORT={graphql_port}")).is_empty()
            && TcpListener::bind(("127.0.0.1", graphql_port)).is_ok(),
        "the GraphQL engine is gone"
    );
    assert!(
        TcpListener::bind(("127.0.0.1", api_port)).is_ok(),
        "the scaling-service is gone"
    );
}
