//! One session: the listeners on the container ports, the wait for `config.json`, the readiness
//! file and the two ways a session ends (`END` from a client, or no client within the timeout).
//!
//! Listener threads never block indefinitely: they poll a stop flag, so a finished [`Session`]
//! (in tests, many per process) leaves no thread behind for long.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::contract::{self, Failure, Params};

/// The line a client sends to end the session.
const END_LINE: &str = "END";
/// Longest request line read; the protocol has one short word, so more is a confused client.
const MAX_LINE: u64 = 1024;

/// One container port and the address it is actually bound on (the container port itself in an
/// image; `127.0.0.1:0` in tests, so tests never collide or leave the loopback interface).
#[derive(Debug, Clone, Copy)]
pub struct PortSpec {
    pub container_port: u16,
    pub bind: SocketAddr,
}

impl PortSpec {
    fn container(port: u16) -> Self {
        Self {
            container_port: port,
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        }
    }
}

/// Everything a session depends on, injected so tests can run many sessions in one process.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub aes_key: Option<String>,
    pub tcp: Vec<PortSpec>,
    pub udp: PortSpec,
    /// How often files, the stop flag and the clock are checked.
    pub poll: Duration,
    /// How long a connection may take to send its line before it gets the status line.
    pub read_timeout: Duration,
}

impl Config {
    /// The configuration inside a real container: the contract's ports on all interfaces.
    pub fn container(dir: PathBuf, aes_key: Option<String>) -> Self {
        Self {
            dir,
            aes_key,
            tcp: contract::TCP_PORTS.map(PortSpec::container).to_vec(),
            udp: PortSpec::container(contract::UDP_PORT),
            poll: Duration::from_millis(20),
            read_timeout: Duration::from_secs(5),
        }
    }
}

/// How a session ended normally (exit code 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    ByClient,
    NoClientWithinTimeout,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ByClient => "session ended: END from a client",
            Self::NoClientWithinTimeout => "session ended: no client within timeout",
        })
    }
}

/// What listener threads tell the session loop.
#[derive(Debug)]
enum Event {
    /// A TCP connection was accepted: resets the timeout clock.
    Connected,
    /// A client sent `END` and has been answered.
    End,
    /// Something was created or moved into the resource directory (see [`watch_resource_dir`]).
    DirectoryChanged,
}

/// State shared with the listener threads.
#[derive(Debug, Clone)]
struct Shared {
    stop: Arc<AtomicBool>,
    /// Set once, when the session becomes ready, to its session id (if the host wrote one).
    ready: Arc<OnceLock<Option<String>>>,
    events: Sender<Event>,
    poll: Duration,
    read_timeout: Duration,
}

/// A started session: parameters read, ports listening.
#[derive(Debug)]
pub struct Session {
    config: Config,
    params: Params,
    shared: Shared,
    events: Receiver<Event>,
    tcp_addrs: Vec<(u16, SocketAddr)>,
    udp_addr: SocketAddr,
}

impl Session {
    /// Waits for `.paramsReady`, reads the parameters and starts listening on every port.
    pub fn start(config: Config) -> Result<Self, Failure> {
        contract::wait_for_file(&config.dir.join(contract::PARAMS_READY), config.poll);
        let params = contract::read_params(&config.dir, config.aes_key.as_deref())?;

        let (tx, events) = mpsc::channel();
        let shared = Shared {
            stop: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(OnceLock::new()),
            events: tx,
            poll: config.poll,
            read_timeout: config.read_timeout,
        };
        let mut tcp_addrs = Vec::new();
        for spec in &config.tcp {
            let listener = TcpListener::bind(spec.bind)
                .map_err(|e| Failure::io(&format!("binding tcp {}", spec.bind), &e))?;
            // Non-blocking accept lets the thread notice the stop flag (see the module doc).
            listener
                .set_nonblocking(true)
                .map_err(|e| Failure::io("configuring listener", &e))?;
            let addr = local_addr(listener.local_addr())?;
            tcp_addrs.push((spec.container_port, addr));
            let (shared, port) = (shared.clone(), spec.container_port);
            thread::spawn(move || serve_tcp(&listener, port, &shared));
        }
        let socket = UdpSocket::bind(config.udp.bind)
            .map_err(|e| Failure::io(&format!("binding udp {}", config.udp.bind), &e))?;
        socket
            .set_read_timeout(Some(config.poll))
            .map_err(|e| Failure::io("configuring udp socket", &e))?;
        let udp_addr = local_addr(socket.local_addr())?;
        let stop = Arc::clone(&shared.stop);
        thread::spawn(move || serve_udp(&socket, &stop));

        Ok(Self {
            config,
            params,
            shared,
            events,
            tcp_addrs,
            udp_addr,
        })
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// One line naming every port and the address it is bound on, for the log.
    pub fn ports_line(&self) -> String {
        let mut line = String::from("listening:");
        for (port, addr) in &self.tcp_addrs {
            line.push_str(&format!(" tcp/{port}={addr}"));
        }
        line.push_str(&format!(
            " udp/{}={}",
            self.config.udp.container_port, self.udp_addr
        ));
        line
    }

    /// The address actually bound for a TCP container port.
    #[cfg(test)]
    pub fn tcp_addr(&self, container_port: u16) -> Option<SocketAddr> {
        self.tcp_addrs
            .iter()
            .find(|(port, _)| *port == container_port)
            .map(|(_, addr)| *addr)
    }

    #[cfg(test)]
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// Serves until the session ends: waits for `config.json`, becomes ready, then waits for `END`
    /// or the timeout. `END` ends the session even before it is ready.
    pub fn run(self) -> Result<Ended, Failure> {
        let dir = &self.config.dir;
        let config_json = dir.join(contract::CONFIG_JSON);
        // Set when ready and the timeout is finite; a zygote (not ready) never times out.
        let mut deadline: Option<Instant> = None;
        let mut holding = false;
        // Without a watch (no inotify) the poll alone finds `config.json`, one poll late at most.
        if let Err(error) = watch_resource_dir(dir, &self.shared) {
            eprintln!("not watching {}: {error}; polling only", dir.display());
        }
        loop {
            match self.events.recv_timeout(self.config.poll) {
                Ok(Event::End) => return Ok(Ended::ByClient),
                Ok(Event::DirectoryChanged) => {}
                Ok(Event::Connected) => {
                    if deadline.is_some() {
                        deadline = self.params.timeout.map(|t| Instant::now() + t);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Unreachable while `self.shared` holds a sender; kept total rather than panicking.
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure::new(contract::EXIT_IO, "listener channel closed"));
                }
            }
            if self.shared.ready.get().is_none() && !holding && config_json.exists() {
                contract::check_config_json(dir, self.config.poll)?;
                if contract::holds_readiness(dir) {
                    // A test asked this box to stay not-ready (the host's readiness timeout).
                    println!("config.json asks to hold readiness; never becoming ready");
                    holding = true;
                    continue;
                }
                let session_id = contract::read_session_id(dir);
                // Shared state first, file second: once the host sees the file, ports say ready.
                let _ = self.shared.ready.set(session_id.clone());
                let path = contract::write_readiness(dir)?;
                println!(
                    "ready: session={} wrote {}",
                    session_id.as_deref().unwrap_or("-"),
                    path.display()
                );
                deadline = self.params.timeout.map(|t| Instant::now() + t);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Ended::NoClientWithinTimeout);
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Wakes the session loop as soon as a file is created or moved into `dir`, so `config.json`
/// (which the host renames into place) is seen at once rather than at the next poll: the poll
/// would add half its period to every session start. The thread ends at the first event after
/// the session is ready or stopped, or when the directory is removed.
fn watch_resource_dir(dir: &Path, shared: &Shared) -> nix::Result<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    // Blocking reads: the thread sleeps in the kernel until the directory changes.
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        dir,
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
    )?;
    let shared = shared.clone();
    thread::spawn(move || {
        loop {
            let events = match inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            let removed = events
                .iter()
                .any(|event| event.mask.contains(AddWatchFlags::IN_IGNORED));
            let done = shared.stop.load(Ordering::Relaxed) || shared.ready.get().is_some();
            if removed || done || shared.events.send(Event::DirectoryChanged).is_err() {
                return;
            }
        }
    });
    Ok(())
}

fn local_addr(addr: io::Result<SocketAddr>) -> Result<SocketAddr, Failure> {
    addr.map_err(|e| Failure::io("reading bound address", &e))
}

fn serve_tcp(listener: &TcpListener, port: u16, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = shared.events.send(Event::Connected);
                let shared = shared.clone();
                // One thread per connection, so a silent client cannot hold up the port.
                thread::spawn(move || {
                    if let Err(e) = answer(&stream, port, &shared) {
                        eprintln!("port {port}: connection failed: {e}");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(shared.poll),
            Err(e) => {
                eprintln!("port {port}: accept failed: {e}");
                thread::sleep(shared.poll);
            }
        }
    }
}

/// Reads one line and answers it: `bye` to `END`, the status line to anything else (including
/// an empty line, EOF, or nothing within the read timeout). Then closes the connection.
fn answer(stream: &TcpStream, port: u16, shared: &Shared) -> io::Result<()> {
    // Accepted sockets may inherit the listener's non-blocking mode on some platforms.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(shared.read_timeout))?;
    let mut line = String::new();
    let _ = BufReader::new(stream.take(MAX_LINE)).read_line(&mut line);
    let mut out = stream;
    if line.trim() == END_LINE {
        out.write_all(b"bye\n")?;
        out.flush()?;
        let _ = stream.shutdown(Shutdown::Write);
        // Only after the reply is written: the process may exit as soon as this is received.
        let _ = shared.events.send(Event::End);
        return Ok(());
    }
    let (state, session) = match shared.ready.get() {
        None => ("waiting", "-"),
        Some(id) => ("ready", id.as_deref().unwrap_or("-")),
    };
    writeln!(
        out,
        "whist-reference-mandelbox port={port} state={state} session={session}"
    )?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                let mut reply = b"whist:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                if let Err(e) = socket.send_to(&reply, from) {
                    eprintln!("udp: reply to {from} failed: {e}");
                }
            }
            // The read timeout is how the stop flag gets checked.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                eprintln!("udp: receive failed: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{CONFIG_JSON, READINESS_FILE, SESSION_ID_FILE, TCP_PORTS, UDP_PORT};
    use crate::testutil::{AES_KEY, TempDir, mark_params_ready, write_params};
    use std::fs;
    use std::path::Path;

    const WAIT: Duration = Duration::from_secs(10);

    fn loopback(port: u16) -> PortSpec {
        PortSpec {
            container_port: port,
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        }
    }

    fn config(dir: &Path) -> Config {
        Config {
            dir: dir.to_owned(),
            aes_key: Some(AES_KEY.to_owned()),
            tcp: TCP_PORTS.map(loopback).to_vec(),
            udp: loopback(UDP_PORT),
            poll: Duration::from_millis(20),
            read_timeout: Duration::from_secs(2),
        }
    }

    /// A session running on its own thread; `done` yields what `run` returned.
    struct Running {
        tcp: Vec<(u16, SocketAddr)>,
        udp: SocketAddr,
        done: Receiver<Result<Ended, Failure>>,
    }

    impl Running {
        fn tcp(&self, port: u16) -> SocketAddr {
            self.tcp
                .iter()
                .find(|(p, _)| *p == port)
                .map(|(_, a)| *a)
                .expect("port is listening")
        }

        fn still_running(&self) -> bool {
            matches!(self.done.try_recv(), Err(mpsc::TryRecvError::Empty))
        }
    }

    fn run_in_background(session: Session) -> Running {
        let tcp = TCP_PORTS
            .iter()
            .map(|&p| (p, session.tcp_addr(p).expect("bound")))
            .collect();
        let udp = session.udp_addr();
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(session.run());
        });
        Running { tcp, udp, done }
    }

    fn start(dir: &Path, timeout: &str) -> Running {
        write_params(dir, "3", timeout);
        mark_params_ready(dir);
        run_in_background(Session::start(config(dir)).expect("session starts"))
    }

    /// Sends `line` and returns the whole reply (the server closes after one line).
    fn request(addr: SocketAddr, line: &str) -> String {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.write_all(line.as_bytes()).expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        reply
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn assign_user(dir: &Path, session_id: &str) {
        fs::write(dir.join(SESSION_ID_FILE), session_id).expect("session_id");
        fs::write(dir.join(CONFIG_JSON), "{\"user\":\"u\"}").expect("config.json");
    }

    #[test]
    fn waits_for_params_ready_then_reads_files() {
        let dir = TempDir::new("params-ready");
        write_params(dir.path(), "5", "-1");
        let (tx, rx) = mpsc::channel();
        let config = config(dir.path());
        thread::spawn(move || {
            let _ = tx.send(Session::start(config));
        });
        thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "started before .paramsReady");
        mark_params_ready(dir.path());
        let session = rx.recv_timeout(WAIT).expect("started").expect("params");
        assert_eq!(session.params().tty, 5);
        assert_eq!(session.params().timeout, None);
        assert_eq!(session.params().host_port_32262, 40123);
    }

    #[test]
    fn bad_tty_fails_start_with_exit_2() {
        let dir = TempDir::new("start-bad-tty");
        write_params(dir.path(), "tty0", "-1");
        mark_params_ready(dir.path());
        let failure = Session::start(config(dir.path())).expect_err("bad tty");
        assert_eq!(failure.code, contract::EXIT_BAD_PARAMS);
    }

    #[test]
    fn answers_a_status_line_on_every_port() {
        let dir = TempDir::new("status");
        let running = start(dir.path(), "-1");
        for port in TCP_PORTS {
            assert_eq!(
                request(running.tcp(port), "\n"),
                format!("whist-reference-mandelbox port={port} state=waiting session=-\n")
            );
        }
        // EOF without a line gets the status line too.
        let mut stream = TcpStream::connect(running.tcp(32262)).expect("connect");
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        assert!(
            reply.starts_with("whist-reference-mandelbox port=32262"),
            "{reply}"
        );
        assert!(running.still_running());
        assert_eq!(request(running.tcp(32262), "END\n"), "bye\n");
    }

    #[test]
    fn readiness_file_is_written_only_after_config_json() {
        let dir = TempDir::new("readiness");
        let running = start(dir.path(), "-1");
        let readiness = dir.path().join(READINESS_FILE);
        thread::sleep(Duration::from_millis(200));
        assert!(!readiness.exists(), "ready before config.json");
        assign_user(dir.path(), "sess-42");
        wait_for("the readiness file", || readiness.exists());
        assert_eq!(fs::read_to_string(&readiness).expect("read"), "done");
        assert_eq!(
            request(running.tcp(32273), "status\n"),
            "whist-reference-mandelbox port=32273 state=ready session=sess-42\n"
        );
        request(running.tcp(32261), "END\n");
        let ended = running.done.recv_timeout(WAIT).expect("ended");
        assert_eq!(ended.expect("normal end"), Ended::ByClient);
    }

    #[test]
    fn config_json_is_seen_at_once_not_at_the_next_poll() {
        let dir = TempDir::new("watch");
        write_params(dir.path(), "3", "-1");
        mark_params_ready(dir.path());
        // A poll far longer than the wait below: only the directory watch can be this quick.
        let slow = Config {
            poll: Duration::from_secs(30),
            ..config(dir.path())
        };
        let session = Session::start(slow).expect("session starts");
        thread::spawn(move || session.run());
        thread::sleep(Duration::from_millis(100));
        // As the host writes it: a temporary name renamed into place.
        let temporary = dir.path().join(".config.json.tmp");
        fs::write(&temporary, "{}").expect("write");
        fs::rename(&temporary, dir.path().join(CONFIG_JSON)).expect("rename");
        let readiness = dir.path().join(READINESS_FILE);
        let started = Instant::now();
        while !readiness.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "config.json was not seen until the next poll"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn end_ends_the_session() {
        let dir = TempDir::new("end");
        let running = start(dir.path(), "-1");
        assert_eq!(request(running.tcp(32262), "  END \r\n"), "bye\n");
        let ended = running.done.recv_timeout(WAIT).expect("ended");
        assert_eq!(ended.expect("normal end"), Ended::ByClient);
    }

    #[test]
    fn no_client_within_timeout_ends_the_session() {
        let dir = TempDir::new("timeout");
        let running = start(dir.path(), "1");
        // A zygote never times out, whatever its timeout.
        thread::sleep(Duration::from_millis(1300));
        assert!(running.still_running(), "timed out before config.json");
        assign_user(dir.path(), "s");
        let readiness = dir.path().join(READINESS_FILE);
        wait_for("the readiness file", || readiness.exists());
        let ready_at = Instant::now();
        // Connections keep it alive past the timeout...
        for _ in 0..5 {
            thread::sleep(Duration::from_millis(400));
            request(running.tcp(32261), "\n");
        }
        assert!(running.still_running(), "timed out despite connections");
        // ...and then it ends about a second after the last one.
        let ended = running.done.recv_timeout(WAIT).expect("ended");
        assert_eq!(ended.expect("normal end"), Ended::NoClientWithinTimeout);
        assert!(ready_at.elapsed() >= Duration::from_secs(3));
    }

    #[test]
    fn invalid_config_json_is_exit_3() {
        let dir = TempDir::new("bad-config");
        let running = start(dir.path(), "-1");
        fs::write(dir.path().join(CONFIG_JSON), "not json").expect("write");
        let failure = running
            .done
            .recv_timeout(WAIT)
            .expect("ended")
            .expect_err("bad config");
        assert_eq!(failure.code, contract::EXIT_BAD_CONFIG);
        assert!(!dir.path().join(READINESS_FILE).exists());
    }

    #[test]
    fn udp_datagrams_are_echoed_with_a_prefix() {
        let dir = TempDir::new("udp");
        let running = start(dir.path(), "-1");
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        socket.set_read_timeout(Some(WAIT)).expect("timeout");
        socket.send_to(b"ping", running.udp).expect("send");
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf).expect("echo");
        assert_eq!(&buf[..n], b"whist:ping");
        assert_eq!(from, running.udp);
        request(running.tcp(32262), "END\n");
    }
}
