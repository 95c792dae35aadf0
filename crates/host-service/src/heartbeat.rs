//! Heartbeats: `heartbeat_at` on the instance row, stamped with the database's clock, so the
//! scaling-service can tell a live host from a dead one and the assign path skips a silent one.
//! Nothing else moves that column. They continue through a drain, which can be long.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use whist_dbclient::{HasuraClient, ops};

/// Beats every `interval` (less up to a tenth of jitter, so a fleet started together spreads
/// out) until `stop`. Returns early when the row is gone: nothing is left to beat for.
pub async fn run(
    db: HasuraClient,
    instance_id: String,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        match db.execute(&ops::heartbeat(&instance_id)).await {
            Ok(true) => tracing::trace!("heartbeat"),
            Ok(false) => {
                tracing::info!("instance row gone; heartbeats stop");
                return;
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed"),
        }
        let jitter = interval.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            () = tokio::time::sleep(interval - jitter) => {}
            () = stop.cancelled() => return,
        }
    }
}
