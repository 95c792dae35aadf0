//! `make bench-fleet`: the local fleet as a newcomer meets it.
//!
//! - From `make run` (already built) to the first assignable mandelbox: the "ready" line, and the
//!   first assign that succeeds, over several cold starts (each a fresh stack and fleet).
//! - From the client's assign to the `json_transport` reply with the ports, over 200 sessions run
//!   one after another on the local fleet (each ended before the next), with the engine's live-query
//!   refresh interval that `make run` uses, against its targets (p50 ≤ 20 ms, p99 ≤ 60 ms).
//!
//! The fleet runs from release binaries (`make run PROFILE=release`; `make bench-fleet` builds
//! them first).

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use whist_client::session::{self, Client, Identity, SessionError, SessionOptions};
use whist_test_support::bench::{quantile, summary};
use whist_test_support::foreground::ForegroundJob;

const COLD_STARTS: usize = 3;
const SESSIONS: usize = 200;
/// `make run`'s default (`local-fleet --refresh-seconds`).
const REFRESH_SECONDS: u64 = 1;

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn client(api_port: u16, user: &str) -> anyhow::Result<Client> {
    Ok(Client::new(SessionOptions {
        scaling_url: format!("http://127.0.0.1:{api_port}").parse()?,
        identity: Identity::User(user.to_owned()),
        regions: vec!["us-east-1".to_owned()],
        client_commit: "local_dev".to_owned(),
        config: serde_json::json!({ "dark_mode": false }),
        timeout: Duration::from_secs(60),
    })?)
}

/// Starts a session, retrying while the fleet has no free mandelbox (a replacement is starting)
/// at a pace the per-user rate limit allows; returns it with the number of refusals before it.
async fn session_when_free(client: &Client) -> anyhow::Result<(session::ReadySession, u32)> {
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.start_session().await {
            Ok(ready) => return Ok((ready, refused)),
            Err(SessionError::Refused(code)) if Instant::now() < deadline => {
                if code != "NO_INSTANCE_AVAILABLE" {
                    anyhow::bail!("assign refused: {code}");
                }
                refused += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(SessionError::Status { status, .. })
                if status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut ready_times = Vec::new();
    let mut first_assign_times = Vec::new();
    let mut stop_times = Vec::new();
    let (mut totals, mut assigns, mut transports) = (Vec::new(), Vec::new(), Vec::new());
    let mut refusals = 0;

    for round in 1..=COLD_STARTS {
        let (api_port, graphql_port) = (free_port()?, free_port()?);
        let mut command = Command::new("make");
        command
            .args(["--no-print-directory", "--quiet", "run", "PROFILE=release"])
            .arg(format!(
                "FLEET_ARGS=--listen 127.0.0.1:{api_port} --graphql-port {graphql_port} \
                 --first-host-address 127.0.8.1 --refresh-seconds {REFRESH_SECONDS}"
            ))
            .current_dir(&repo);
        let started = Instant::now();
        let mut fleet = ForegroundJob::start(command)?;
        fleet.wait_for_line("local fleet ready", Duration::from_secs(180))?;
        let ready = started.elapsed();
        let first = client(api_port, "bench-first")?;
        let (session, _) = session_when_free(&first).await?;
        let assignable = started.elapsed() - session.transport_time;
        session::end(&session, Duration::from_secs(30)).await?;
        println!(
            "cold start {round}: ready line {:.2} s, first assign answered {:.2} s",
            ready.as_secs_f64(),
            assignable.as_secs_f64()
        );
        ready_times.push(ready);
        first_assign_times.push(assignable);

        if round == COLD_STARTS {
            for n in 0..SESSIONS {
                let client = client(api_port, &format!("bench-user-{n}"))?;
                let (ready, refused) = session_when_free(&client).await?;
                refusals += refused;
                assigns.push(ready.assign_time);
                transports.push(ready.transport_time);
                totals.push(ready.assign_time + ready.transport_time);
                session::end(&ready, Duration::from_secs(30)).await?;
            }
        }

        let stopping = Instant::now();
        fleet.interrupt()?;
        fleet.wait(Duration::from_secs(120))?;
        stop_times.push(stopping.elapsed());
    }

    println!();
    println!(
        "make run → ready line (mandelbox WAITING, container running): {}",
        summary(&mut ready_times)
    );
    println!(
        "make run → first assign answered:                             {}",
        summary(&mut first_assign_times)
    );
    println!(
        "Ctrl-C → everything stopped and removed:                      {}",
        summary(&mut stop_times)
    );
    println!(
        "{SESSIONS} sessions, one after another, engine refresh {REFRESH_SECONDS} s (changes pushed at once by NOTIFY):"
    );
    println!(
        "  assign → json_transport reply with ports: {}",
        summary(&mut totals.clone())
    );
    println!(
        "    targets: p50 ≤ 20 ms, p99 ≤ 60 ms; measured p50 {:.1} ms, p99 {:.1} ms",
        quantile(&totals, 0.5).as_secs_f64() * 1e3,
        quantile(&totals, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  assign alone:                             {}",
        summary(&mut assigns)
    );
    println!(
        "  json_transport alone:                     {}",
        summary(&mut transports)
    );
    println!("  assigns refused while a replacement box started: {refusals}");
    Ok(())
}
