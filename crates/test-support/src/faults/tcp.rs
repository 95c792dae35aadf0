//! The TCP proxy whose connections can be cut.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use super::{spawn_server, stop_server};

/// A TCP proxy on a loopback port to `upstream` whose connections can be cut.
///
/// It copies bytes both ways and knows nothing of the protocol, so HTTP, websockets and the
/// Postgres protocol all pass. [`CuttableProxy::cut`] closes every open connection; while cut,
/// new connections are accepted and closed at once, so a client sees its connection end
/// immediately (as when a server goes away) and its reconnect loop runs at the pace of its own
/// backoff, rather than hanging on a connect that never completes.
pub struct CuttableProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    stats: Arc<TcpStats>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct TcpStats {
    /// Connections forwarded to the upstream, ever.
    accepted: AtomicUsize,
    /// Connections closed on arrival because the proxy was cut.
    refused: AtomicUsize,
    /// Connections being forwarded now.
    open: AtomicUsize,
}

/// Counts a forwarded connection as open for as long as its task holds this.
struct OpenGuard(Arc<TcpStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CuttableProxy {
    /// Starts forwarding from a free loopback port to `upstream`. Refuses a non-loopback
    /// upstream.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        if !upstream.ip().is_loopback() {
            bail!("the cuttable proxy only forwards to a loopback address, not {upstream}");
        }
        let cut = Arc::new(watch::Sender::new(false));
        let stats = Arc::new(TcpStats::default());
        let (addr, shutdown, thread) = {
            let cut = Arc::clone(&cut);
            let stats = Arc::clone(&stats);
            spawn_server("whist-cuttable-proxy", move |listener, stop| async move {
                tokio::select! {
                    () = accept_loop(listener, upstream, cut, stats) => {}
                    _ = stop => {}
                }
            })?
        };
        Ok(Self {
            addr,
            upstream,
            cut,
            stats,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The loopback address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every open connection and refuses new ones until [`CuttableProxy::restore`].
    /// Returns once every connection is closed (or after 5 s), so what a test does next
    /// already sees the cut.
    pub fn cut(&self) {
        self.cut.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.stats.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the proxy is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// How many connections have been forwarded since the start (a reconnect counts anew).
    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// How many connections were closed on arrival because the proxy was cut.
    pub fn refused(&self) -> usize {
        self.stats.refused.load(Ordering::SeqCst)
    }

    /// How many connections are being forwarded now.
    pub fn open_connections(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for CuttableProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CuttableProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("cut", &self.is_cut())
            .field("open", &self.open_connections())
            .finish_non_exhaustive()
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        stop_server(self.shutdown.take(), self.thread.take());
    }
}

/// Accepts connections and forwards each in a task of a `JoinSet` owned by this future, so
/// dropping the future (on shutdown) ends them all.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    stats: Arc<TcpStats>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let mut client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Transient (a reset before accept, or out of descriptors): try again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if *cut.borrow() {
            stats.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        stats.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(Arc::clone(&stats));
        // Subscribed before the task runs; `wait_for` looks at the current value first, so a
        // cut between the check above and here is not missed.
        let mut cut = cut.subscribe();
        connections.spawn(async move {
            let _guard = guard;
            let upstream = tokio::select! {
                connected = TcpStream::connect(upstream) => connected,
                _ = cut.wait_for(|cut| *cut) => return,
            };
            // An unreachable upstream: the client sees its connection closed.
            let Ok(mut upstream) = upstream else { return };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                _ = cut.wait_for(|cut| *cut) => {}
            }
            // Both sockets close as they drop here.
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on a loopback port, on the test's runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("echo");
        echoed
    }

    /// Whether the peer has closed `stream`: a read ends (EOF or reset) within 5 s.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn fault_cuttable_proxy_cuts_and_restores() {
        let echo = echo_server().await;
        let proxy = CuttableProxy::start(echo).expect("proxy");
        assert_eq!(proxy.upstream(), echo);

        let mut first = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut second = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut first, b"hello").await, b"hello");
        assert_eq!(round_trip(&mut second, b"world").await, b"world");
        assert_eq!(proxy.open_connections(), 2);

        proxy.cut();
        assert!(proxy.is_cut());
        assert_eq!(
            proxy.open_connections(),
            0,
            "cut returns once they are closed"
        );
        assert!(closed(&mut first).await);
        assert!(closed(&mut second).await);

        // While cut, a connection is accepted and closed at once.
        for _ in 0..2 {
            let mut refused = TcpStream::connect(proxy.addr()).await.expect("connect");
            let _ = refused.write_all(b"anyone?").await;
            assert!(closed(&mut refused).await);
        }
        assert_eq!(proxy.refused(), 2);

        proxy.restore();
        assert!(!proxy.is_cut());
        let mut third = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_eq!(round_trip(&mut third, b"again").await, b"again");
        assert_eq!(proxy.accepted(), 3);

        // Large transfers pass both ways intact (a websocket is just bytes to it).
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = third.split();
        let (_, echoed) = tokio::join!(
            async { write.write_all(&big).await.expect("write") },
            async {
                let mut echoed = vec![0; big.len()];
                read.read_exact(&mut echoed).await.expect("read");
                echoed
            }
        );
        assert!(echoed == big);

        let addr = proxy.addr();
        drop(proxy);
        assert!(closed(&mut third).await, "drop closes the connections");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "and stops listening"
        );
    }

    #[test]
    fn fault_cuttable_proxy_works_from_a_plain_test() {
        use std::io::{Read, Write};
        let upstream = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let proxy = CuttableProxy::start(upstream.local_addr().expect("addr")).expect("proxy");
        let mut client = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        let (mut server, _) = upstream.accept().expect("accept");
        client.write_all(b"ping").expect("write");
        let mut got = [0; 4];
        server.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");

        proxy.cut();
        // The upstream side is closed too, so the server sees the client go.
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(matches!(server.read(&mut got), Ok(0) | Err(_)));
    }
}
