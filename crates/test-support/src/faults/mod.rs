//! Loopback fault injection for tests: an EC2 API proxy that can throttle, blank or hide
//! answers, and a TCP proxy whose connections can be cut.
//!
//! - [`Ec2FaultProxy`] sits between an AWS SDK client and moto. It forwards EC2 Query requests
//!   (`POST /` with a form body naming the `Action`) unchanged, counts them per action, and on
//!   demand answers them itself the way EC2 does when it is throttling or degraded
//!   ([`FaultMode`]). moto cannot be asked to misbehave, and the fleet controller's handling of
//!   `RequestLimitExceeded`, of a DescribeInstances that momentarily omits a launched instance
//!   (EC2 is eventually consistent) and of slow calls is exactly what needs proving.
//! - [`CuttableProxy`] forwards bytes between a client and a TCP upstream (the GraphQL engine,
//!   websockets included) and can close every connection and refuse new ones until restored,
//!   which is how a test makes a service lose the engine without stopping the engine for the
//!   other tests that share it.
//!
//! Both run on a background thread with a tokio runtime of their own, so they work from a plain
//! `#[test]` as well as from any `#[tokio::test]` runtime flavour, and a blocked or finished test
//! runtime cannot stall them. Dropping one stops its thread and closes its connections.
//!
//! Everything listens on 127.0.0.1 and [`Ec2FaultProxy::start`] refuses a non-loopback upstream,
//! so no test can be pointed at the real AWS through it.
//!
//! The AWS SDK signs requests (SigV4) over the Host header, which the proxy rewrites to the
//! upstream's; that is harmless because moto does not verify signatures. moto does read the
//! `Authorization` header, though: a request without one is routed to its S3 backend (a POST to
//! `/` without credentials comes back as S3's `ListAllMyBucketsResult`), so raw test requests
//! must carry a SigV4-shaped header (see the tests' `EC2_AUTH`).

mod ec2;
mod tcp;
mod xml;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use self::ec2::{Ec2FaultProxy, FaultMode, ThrottleError};
pub use self::tcp::CuttableProxy;

/// Binds a loopback port here (so the address is known and a bind failure is reported to the
/// caller), then runs `serve(listener, stop)` on a new thread with a current-thread runtime.
/// When `serve` returns (it should on `stop`), the runtime is dropped, which drops every task
/// still on it and so closes their connections.
fn spawn_server<F, Fut>(
    name: &str,
    serve: F,
) -> anyhow::Result<(SocketAddr, oneshot::Sender<()>, JoinHandle<()>)>
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a loopback port")?;
    listener
        .set_nonblocking(true)
        .context("make the listener non-blocking")?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the proxy's runtime")?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                // `from_std` fails only without an I/O driver, which this runtime has.
                if let Ok(listener) = TcpListener::from_std(listener) {
                    serve(listener, stop_rx).await;
                }
            });
            drop(runtime);
        })
        .with_context(|| format!("start the {name} thread"))?;
    Ok((addr, stop_tx, thread))
}

fn stop_server(shutdown: Option<oneshot::Sender<()>>, thread: Option<JoinHandle<()>>) {
    if let Some(shutdown) = shutdown {
        let _ = shutdown.send(());
    }
    if let Some(thread) = thread {
        let _ = thread.join();
    }
}

/// Locks a mutex, ignoring poisoning: the data (counts, a mode) stays consistent whatever
/// panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
