//! Decompression bombs cost their senders, not the host: a `json_transport` configuration is
//! inflated only after the caller is known to own the box, off the async workers and a few at a
//! time. While 16 senders with valid tokens (and no session) keep sending bombs, a legitimate
//! session on the same host starts about as fast as on an idle one, and `/healthz` answers.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Host, HostOptions};
use serde_json::json;
use whist_types::MandelboxStatus;

/// base64 of a gzip stream that inflates to 80 MiB of zeros (past the decoder's 64 MiB cap).
fn bomb() -> String {
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..80 {
        gzip.write_all(&zeros).expect("compress");
    }
    let compressed = gzip.finish().expect("compress");
    base64::engine::general_purpose::STANDARD.encode(compressed)
}

/// How long the owner's `json_transport` takes from claim to ready.
async fn session_start(host: &Host, user: &str) -> Duration {
    let id = host.claim(user).await;
    host.wait_for_status(id, MandelboxStatus::Connecting).await;
    let started = Instant::now();
    let (status, body) = host.transport(id, user).await;
    assert_eq!(status, 200, "{body}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_from_strangers_leave_a_legitimate_session_alone() {
    let host = Arc::new(
        Host::start(HostOptions {
            capacity: 3,
            ..HostOptions::default()
        })
        .await,
    );
    let idle = session_start(&host, &common::unique("first")).await;

    // A target the bombers may name: a box assigned to someone else.
    let victim = common::unique("victim");
    let target = host.claim(&victim).await;
    host.wait_for_status(target, MandelboxStatus::Connecting)
        .await;
    let body =
        Arc::new(json!({ "mandelbox_id": target.to_string(), "json_data": bomb() }).to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let bombers: Vec<_> = (0..16)
        .map(|n| {
            let (host, body, stop, refused) =
                (host.clone(), body.clone(), stop.clone(), refused.clone());
            tokio::spawn(async move {
                let token = host.issuer.token(&format!("bomber-{n}"));
                // Bounded: at most 20 bombs each, and never past the attack's end.
                for _ in 0..20 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (status, _) = host.transport_raw(Some(&token), (*body).clone()).await;
                    assert_eq!(status, 403, "a stranger's bomb is refused unread");
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let attacked = session_start(&host, &common::unique("second")).await;
    let health = Instant::now();
    let (status, _) = host.get_ops("/healthz").await;
    let health = health.elapsed();
    stop.store(true, Ordering::SeqCst);
    for bomber in bombers {
        bomber.await.expect("bomber");
    }
    eprintln!(
        "json_transport idle {idle:?}, under 16 bombers {attacked:?}; /healthz {health:?}; {} bombs refused",
        refused.load(Ordering::SeqCst)
    );
    assert_eq!(status, 200);
    assert!(refused.load(Ordering::SeqCst) >= 16, "the attack ran");
    // Within twice the idle latency (plus a little for this 2-core machine's noise).
    assert!(
        attacked <= idle * 2 + Duration::from_millis(250),
        "under attack {attacked:?}, idle {idle:?}"
    );
    assert!(health < Duration::from_secs(1), "/healthz took {health:?}");

    // The victim's own session is untouched by all that.
    let (status, reply) = host.transport(target, &victim).await;
    assert_eq!(status, 200, "{reply}");
}
