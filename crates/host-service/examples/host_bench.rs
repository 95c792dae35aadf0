//! host-service benchmarks: prints figures, asserts nothing. Run with `make bench`.
//!
//! - zygote creation by the service vs a bare create + start of the same container spec through
//!   the same Docker client (both sequential), as a ratio;
//! - from the claim (the ALLOCATED write) to the row turning CONNECTING, and from the box's
//!   readiness file to the `json_transport` reply;
//! - the `json_transport` round trip of a legitimate session idle, while 16 strangers keep
//!   sending decompression bombs, and while 200 connections send their headers a byte a second;
//! - resident memory of the service binary, idle and with 10 mandelboxes.
//!
//! The host under measurement is the release binary in its own process, reached over TLS pinned
//! to the certificate it publishes; attackers run on a runtime of their own, so the legitimate
//! client's latency is the host's, not the attackers' tasks queued ahead of it.
//!
//! Needs the Docker engine and the reference mandelbox image (built on first use), and the
//! release binary next to this example (`make bench` builds both).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use host_service::mandelbox::spec::{BoxIdentity, BoxResources, HostFeatures, container_spec};
use host_service::mandelbox::{BoxPaths, files, labels};
use host_service::resources::ports::PortAllocator;
use host_service::runtime::ContainerRuntime;
use host_service::runtime::docker::DockerRuntime;
use whist_dbclient::{ClaimOutcome, HasuraClient, ops};
use whist_test_support::bench::{mean, quantile, summary};
use whist_test_support::jwt::TestIssuer;
use whist_test_support::{Stack, StackInfo, StackOptions};
use whist_types::{Environment, InstanceStatus, MandelboxId, MandelboxStatus, NewInstance};

const ROUNDS: usize = 20;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::start(&StackOptions::default())?;
    let db = stack.info().client();
    let image = whist_test_support::reference_mandelbox_image()?;
    let docker = DockerRuntime::connect(Path::new("/var/run/docker.sock")).await?;
    let issuer = TestIssuer::start().await?;
    let root = std::env::temp_dir().join(format!("whist-host-bench-{}", std::process::id()));

    println!("== zygote creation, sequential ({ROUNDS} each)");
    let bare = bare_create_start(&docker, &image, &root.join("bare")).await?;
    let binary = release_binary()?;
    let host = Bench::start(&stack, &db, &issuer, &image, &root.join("host"), &binary).await?;
    let host_spinups = host.sequential_zygotes(&docker, ROUNDS).await?;
    println!(
        "  bare create+start:          {}",
        summary(&mut bare.clone())
    );
    println!(
        "  host-service zygote:        {}",
        summary(&mut host_spinups.clone())
    );
    println!(
        "  ratio host / bare (means):  {:.2}  (host adds the resource files and the WAITING row)",
        mean(&host_spinups).as_secs_f64() / mean(&bare).as_secs_f64()
    );

    println!("== assignment ({ROUNDS} sessions, one at a time)");
    let (mut to_connecting, mut ready_to_reply, mut transport_total) =
        host.sessions(&issuer, ROUNDS).await?;
    println!(
        "  ALLOCATED write → CONNECTING:  {}",
        summary(&mut to_connecting)
    );
    println!(
        "  readiness file → HTTP reply:   {}",
        summary(&mut ready_to_reply)
    );
    println!(
        "  json_transport round trip:     {}",
        summary(&mut transport_total)
    );

    println!("== json_transport of a legitimate session under attack ({ROUNDS} sessions each)");
    let idle = transport_total.clone();
    let bombs = Attack::bombs(&host, &issuer, 16);
    let cpu = CpuShare::start(host.child.id());
    let (_, mut bombs_ready_to_reply, mut under_bombs) = host.sessions(&issuer, ROUNDS).await?;
    let (host_cpu, bench_cpu) = cpu.stop();
    let unread = bombs.unread.load(std::sync::atomic::Ordering::Relaxed);
    let bombs_sent = bombs.stop().await;
    let slowloris = Attack::slowloris(&host, 200).await?;
    let (_, _, mut under_slowloris) = host.sessions(&issuer, ROUNDS).await?;
    slowloris.stop().await;
    let ceiling = median(&idle) * 2;
    println!(
        "  idle:                         {}",
        summary(&mut idle.clone())
    );
    println!(
        "  16 bomb senders ({bombs_sent:>4} sent): {}",
        summary(&mut under_bombs)
    );
    println!(
        "    ({unread} of the bombs answered 429 unread: each sender's allowance is 5 at once, 1/s)"
    );
    println!(
        "    (of which readiness file → reply: {})",
        summary(&mut bombs_ready_to_reply)
    );
    println!(
        "    (CPU meanwhile, in cores: host-service {host_cpu:.2}, attackers and client {bench_cpu:.2}, of 2 shared)"
    );
    println!(
        "  200 slowloris connections:    {}",
        summary(&mut under_slowloris)
    );
    println!(
        "  ceiling (2 × idle median):    {:.1} ms; medians {:.1} / {:.1} ms",
        ceiling.as_secs_f64() * 1e3,
        median(&under_bombs).as_secs_f64() * 1e3,
        median(&under_slowloris).as_secs_f64() * 1e3
    );
    host.stop(&docker).await?;

    println!("== resident memory of the release binary");
    for capacity in [0, 10] {
        let rss = Bench::resident_memory(
            &stack, &db, &issuer, &image, &root, &binary, capacity, &docker,
        )
        .await?;
        println!(
            "  {capacity:>2} mandelboxes: {:.1} MiB",
            rss as f64 / 1024.0 / 1024.0
        );
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// CPU time of the host-service process and of this one over a stretch of wall time, in cores.
struct CpuShare {
    host: u32,
    started: Instant,
    at_start: (f64, f64),
}

impl CpuShare {
    fn start(host: u32) -> Self {
        Self {
            host,
            started: Instant::now(),
            at_start: (cpu_seconds(&host.to_string()), cpu_seconds("self")),
        }
    }

    fn stop(self) -> (f64, f64) {
        let wall = self.started.elapsed().as_secs_f64();
        let host = cpu_seconds(&self.host.to_string()) - self.at_start.0;
        let bench = cpu_seconds("self") - self.at_start.1;
        (host / wall, bench / wall)
    }
}

/// User plus system CPU seconds of `/proc/<pid>` so far (0 if unreadable).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at state; utime and stime
    // are the 14th and 15th fields of the line, in clock ticks (100 a second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn attackers_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the attackers")
}

fn median(samples: &[Duration]) -> Duration {
    quantile(samples, 0.5)
}

/// Hostile clients of the host's `json_transport`, bounded in count, stopped by `stop`.
struct Attack {
    stop: tokio_util::sync::CancellationToken,
    /// The attackers' own runtime (two workers).
    runtime: tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
    /// Requests the host refused at the caller's allowance, before reading their bodies.
    unread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Attack {
    /// `senders` strangers with valid tokens sending base64 gzip bombs (80 MiB of zeros) for
    /// random mandelboxes, back to back.
    fn bombs(host: &Bench, issuer: &TestIssuer, senders: usize) -> Self {
        use std::io::Write as _;
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..80 {
            let _ = gzip.write_all(&zeros);
        }
        let bomb = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            gzip.finish().unwrap_or_default(),
        );
        let url = format!(
            "https://127.0.0.1:{}/json_transport",
            host.transport_addr.port()
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let runtime = attackers_runtime();
        let mut tasks = Vec::new();
        let unread = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // A client of the attackers' own: connections live on the runtime that made them.
        let attackers = reqwest::Client::builder()
            .use_preconfigured_tls((*host.tls).clone())
            .build()
            .expect("a client");
        for n in 0..senders {
            let (http, url, stop) = (attackers.clone(), url.clone(), stop.clone());
            let unread = unread.clone();
            let token = issuer.token(&format!("bomber-{n}"));
            let body = serde_json::json!({
                "mandelbox_id": MandelboxId::new_random().to_string(),
                "json_data": bomb,
            })
            .to_string();
            tasks.push(runtime.spawn(async move {
                let mut sent = 0;
                // At most 10,000 each: bounded even if `stop` never came.
                while !stop.is_cancelled() && sent < 10_000 {
                    let request = http.put(&url).bearer_auth(&token).body(body.clone());
                    tokio::select! {
                        () = stop.cancelled() => break,
                        response = request.send() => {
                            sent += 1;
                            if response.is_ok_and(|r| r.status() == 429) {
                                unread.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
                sent
            }));
        }
        Self {
            stop,
            runtime,
            tasks,
            unread,
        }
    }

    /// `connections` TLS connections that start a request and send its headers a byte a
    /// second (those past the host's per-address cap are closed by the host at once).
    async fn slowloris(host: &Bench, connections: usize) -> anyhow::Result<Self> {
        use tokio::io::AsyncWriteExt as _;
        let config = host.tls.clone();
        let addr = host.transport_addr;
        let stop = tokio_util::sync::CancellationToken::new();
        let runtime = attackers_runtime();
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (config, stop) = (config.clone(), stop.clone());
            tasks.push(runtime.spawn(async move {
                let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                    return 0;
                };
                let Ok(name) = rustls::pki_types::ServerName::try_from("127.0.0.1") else {
                    return 0;
                };
                let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                else {
                    return 0;
                };
                let _ = tls
                    .write_all(b"PUT /json_transport HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await;
                // One byte a second, for at most two minutes.
                for _ in 0..120 {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    if tls.write_all(b"a").await.is_err() {
                        break;
                    }
                }
                1
            }));
        }
        // Let the connections open before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(Self {
            stop,
            runtime,
            tasks,
            unread: Default::default(),
        })
    }

    /// Ends the attack; how many requests (or connections) it made.
    async fn stop(self) -> usize {
        self.stop.cancel();
        let mut total = 0;
        for task in self.tasks {
            total += task.await.unwrap_or(0);
        }
        self.runtime.shutdown_background();
        total
    }
}

/// The same container spec the service builds, created and started straight through bollard.
async fn bare_create_start(
    docker: &DockerRuntime,
    image: &str,
    root: &Path,
) -> anyhow::Result<Vec<Duration>> {
    let mut ports = PortAllocator::new(PortAllocator::default_range(), []);
    let config = host_service::config::MandelboxConfig {
        image: image.to_owned(),
        app: "browsers/whistium".to_owned(),
        memory_bytes: 6_552_550_944,
        shm_bytes: 2_147_483_648,
        pids_limit: 4096,
        protocol_timeout: -1,
        whist_dir: root.join("whist"),
        temp_dir: root.join("temp"),
        uinput_path: "/dev/uinput".into(),
        apparmor_profile: "mandelbox-apparmor-profile".to_owned(),
    };
    let features = HostFeatures::detect();
    let mut samples = Vec::new();
    for _ in 0..ROUNDS {
        let id = MandelboxId::new_random();
        let paths = BoxPaths::new(&config.whist_dir, &config.temp_dir, id, "bench");
        let resources = BoxResources {
            ports: ports.allocate()?,
            tty: 10,
            gpu: None,
            input_devices: Vec::new(),
        };
        // The box waits for its parameters; write them first, outside the timing, as a bare
        // Docker user would have to as well.
        files::write_start_params(
            &paths.resources,
            &files::StartParams {
                ports: resources.ports,
                tty: 10,
                gpu_index: 0,
                protocol_timeout: -1,
            },
        )?;
        let identity = BoxIdentity {
            id,
            instance_id: "bench-bare",
            server_session_id: "bench",
            aes_key: "00112233445566778899aabbccddeeff",
            environment: Environment::Local,
        };
        let mut spec = container_spec(&config, &features, &identity, &paths, &resources);
        spec.labels = BTreeMap::from([(labels::INSTANCE_ID.to_owned(), "bench-bare".to_owned())]);
        let started = Instant::now();
        let container = docker.create(&spec).await?;
        docker.start(&container).await?;
        samples.push(started.elapsed());
        docker.remove(&container, Duration::ZERO).await?;
        ports.release(resources.ports);
    }
    Ok(samples)
}

fn release_binary() -> anyhow::Result<PathBuf> {
    let example = std::env::current_exe()?;
    // target/release/examples/bench → target/release/host-service
    let binary = example
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("host-service"))
        .context("locate the release binary")?;
    if !binary.exists() {
        bail!("{} is missing: run `make bench`", binary.display());
    }
    Ok(binary)
}

/// One host-service under measurement: the release binary, one box.
struct Bench {
    db: HasuraClient,
    instance_id: String,
    child: std::process::Child,
    transport_addr: std::net::SocketAddr,
    ops_addr: std::net::SocketAddr,
    /// TLS trusting exactly the certificate the host published on its row.
    tls: std::sync::Arc<rustls::ClientConfig>,
    http: reqwest::Client,
    root: PathBuf,
}

impl Bench {
    async fn start(
        stack: &Stack,
        db: &HasuraClient,
        issuer: &TestIssuer,
        image: &str,
        root: &Path,
        binary: &Path,
    ) -> anyhow::Result<Self> {
        let instance_id = insert_instance(db, 1).await?;
        let free = || -> anyhow::Result<std::net::SocketAddr> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let (transport_addr, ops_addr) = (free()?, free()?);
        let args = args(
            stack.info(),
            issuer,
            image,
            root,
            &instance_id,
            &transport_addr.to_string(),
            &ops_addr.to_string(),
        );
        let child = std::process::Command::new(binary)
            .args(&args[1..])
            .env("RUST_LOG", "warn")
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let fingerprint = loop {
            let row = db.execute(&ops::instance_by_id(&instance_id)).await?;
            if let Some(fingerprint) = row.and_then(|row| row.tls_fingerprint) {
                break fingerprint;
            }
            if Instant::now() > deadline {
                bail!("the host never registered");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let tls = whist_serve::pinned::client_config(&fingerprint)
            .context("the host's row holds no fingerprint")?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .build()?;
        let bench = Self {
            db: db.clone(),
            instance_id,
            child,
            transport_addr,
            ops_addr,
            tls: std::sync::Arc::new(tls),
            http,
            root: root.to_owned(),
        };
        bench
            .wait_rows(|rows| {
                rows.iter()
                    .filter(|r| r.status == MandelboxStatus::Waiting)
                    .count()
                    == 1
            })
            .await?;
        Ok(bench)
    }

    async fn rows(&self) -> anyhow::Result<Vec<whist_types::Mandelbox>> {
        Ok(self
            .db
            .execute(&ops::mandelboxes_on_instance(&self.instance_id))
            .await?)
    }

    async fn wait_rows(
        &self,
        done: impl Fn(&[whist_types::Mandelbox]) -> bool,
    ) -> anyhow::Result<Vec<whist_types::Mandelbox>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self.rows().await?;
            if done(&rows) {
                return Ok(rows);
            }
            if Instant::now() > deadline {
                bail!("rows never settled: {rows:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Removes the zygote `rounds` times and reads the service's own spin-up time of each
    /// replacement from its metrics.
    async fn sequential_zygotes(
        &self,
        docker: &DockerRuntime,
        rounds: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut samples = Vec::new();
        let mut previous = self.spinup_sum_and_count().await?;
        for _ in 0..rounds {
            let containers = docker
                .list((labels::INSTANCE_ID, &self.instance_id))
                .await?;
            let old = self.rows().await?;
            for container in containers {
                docker.remove(&container.id, Duration::ZERO).await?;
            }
            self.wait_rows(|rows| {
                rows.len() == 1
                    && rows[0].status == MandelboxStatus::Waiting
                    && !old.iter().any(|o| o.id == rows[0].id)
            })
            .await?;
            let now = self.spinup_sum_and_count().await?;
            if now.1 > previous.1 {
                samples.push(Duration::from_secs_f64(
                    (now.0 - previous.0) / (now.1 - previous.1),
                ));
            }
            previous = now;
        }
        Ok(samples)
    }

    async fn spinup_sum_and_count(&self) -> anyhow::Result<(f64, f64)> {
        let text = reqwest::get(format!("http://{}/metrics", self.ops_addr))
            .await?
            .text()
            .await?;
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((
            value("whist_host_zygote_spinup_seconds_sum "),
            value("whist_host_zygote_spinup_seconds_count "),
        ))
    }

    /// Full sessions one at a time: claim → CONNECTING, json_transport → reply, end.
    async fn sessions(
        &self,
        issuer: &TestIssuer,
        rounds: usize,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
        let (mut to_connecting, mut ready_to_reply, mut totals) =
            (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let rows = self
                .wait_rows(|rows| rows.len() == 1 && rows[0].status == MandelboxStatus::Waiting)
                .await?;
            let id = rows[0].id;
            let user = format!("bench-user-{round}");
            let claimed_at = Instant::now();
            match self.db.claim_mandelbox(id, &user, "1").await? {
                ClaimOutcome::Claimed(_) => {}
                other => bail!("claim: {other:?}"),
            }
            let claimed_at = claimed_at + (Instant::now() - claimed_at) / 2;
            loop {
                let row = self.db.execute(&ops::mandelbox_by_id(id)).await?;
                if row.is_some_and(|r| r.status == MandelboxStatus::Connecting) {
                    to_connecting.push(claimed_at.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let sent = Instant::now();
            let response = self
                .http
                .put(format!(
                    "https://127.0.0.1:{}/json_transport",
                    self.transport_addr.port()
                ))
                .bearer_auth(issuer.token(&user))
                .json(&serde_json::json!({ "mandelbox_id": id.to_string(), "json_data": "{}" }))
                .send()
                .await?;
            let replied = SystemTime::now();
            totals.push(sent.elapsed());
            let body: serde_json::Value = response.json().await?;
            let port = body["result"]["port_32262"]
                .as_u64()
                .context("reply has ports")?;
            let ready_file = self
                .root
                .join("whist")
                .join(id.to_string())
                .join("mandelboxResourceMappings")
                .join(files::READY);
            let written = std::fs::metadata(&ready_file)?.modified()?;
            ready_to_reply.push(replied.duration_since(written).unwrap_or_default());
            end_session(port as u16)?;
            self.wait_rows(|rows| rows.len() == 1 && rows[0].id != id)
                .await?;
        }
        Ok((to_connecting, ready_to_reply, totals))
    }

    async fn stop(mut self, docker: &DockerRuntime) -> anyhow::Result<()> {
        nix_terminate(self.child.id());
        let code = tokio::task::spawn_blocking(move || self.child.wait())
            .await??
            .code();
        let left = docker
            .list((labels::INSTANCE_ID, &self.instance_id))
            .await?;
        if code != Some(0) || !left.is_empty() {
            bail!(
                "unclean stop: exit {code:?}, {} containers left",
                left.len()
            );
        }
        Ok(())
    }

    /// Runs the release binary with `capacity` zygotes and reads its resident set once they are
    /// all up and it has idled a few seconds.
    #[allow(clippy::too_many_arguments)]
    async fn resident_memory(
        stack: &Stack,
        db: &HasuraClient,
        issuer: &TestIssuer,
        image: &str,
        root: &Path,
        binary: &Path,
        capacity: i32,
        docker: &DockerRuntime,
    ) -> anyhow::Result<u64> {
        let instance_id = insert_instance(db, capacity).await?;
        let ops_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let args = args(
            stack.info(),
            issuer,
            image,
            &root.join(format!("rss-{capacity}")),
            &instance_id,
            "127.0.0.1:0",
            &format!("127.0.0.1:{ops_port}"),
        );
        let mut child = std::process::Command::new(binary)
            .args(&args[1..])
            .env("RUST_LOG", "warn")
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = db
                .execute(&ops::mandelboxes_on_instance(&instance_id))
                .await?;
            let registered = db
                .execute(&ops::instance_by_id(&instance_id))
                .await?
                .is_some_and(|row| row.status == InstanceStatus::Active);
            if registered
                && rows
                    .iter()
                    .filter(|r| r.status == MandelboxStatus::Waiting)
                    .count()
                    == capacity as usize
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("zygotes never came up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")?;
        nix_terminate(child.id());
        let code = child.wait()?.code();
        let left = docker.list((labels::INSTANCE_ID, &instance_id)).await?;
        if code != Some(0) || !left.is_empty() {
            bail!("unclean exit {code:?}, {} containers left", left.len());
        }
        Ok(rss_kib * 1024)
    }
}

fn nix_terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn end_session(port: u16) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"END\n")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(())
}

async fn insert_instance(db: &HasuraClient, capacity: i32) -> anyhow::Result<String> {
    let id = format!("i-bench-{}", uuid::Uuid::new_v4().simple());
    db.execute(&ops::insert_instances(&[NewInstance {
        id: id.clone(),
        provider: "AWS".into(),
        region: "bench".into(),
        image_id: "ami-bench".into(),
        client_sha: "local".into(),
        instance_type: "g4dn.12xlarge".into(),
        remaining_capacity: capacity,
        status: InstanceStatus::PreConnection,
        fleet: None,
    }]))
    .await?;
    Ok(id)
}

fn args(
    info: &StackInfo,
    issuer: &TestIssuer,
    image: &str,
    root: &Path,
    instance_id: &str,
    listen: &str,
    ops_listen: &str,
) -> Vec<String> {
    [
        "host-service",
        "--environment",
        "local",
        "--local",
        "--instance-id",
        instance_id,
        "--instance-type",
        "g4dn.12xlarge",
        "--image-id",
        "ami-bench",
        "--region",
        "bench",
        "--host-commit",
        "local-bench",
        "--hasura-url",
        &info.graphql_url,
        "--hasura-websocket-url",
        &info.websocket_url,
        "--hasura-admin-secret",
        &info.admin_secret,
        "--mandelbox-image",
        image,
        "--whist-dir",
        &root.join("whist").to_string_lossy(),
        "--temp-dir",
        &root.join("temp").to_string_lossy(),
        "--listen",
        listen,
        "--ops-listen",
        ops_listen,
        "--auth-issuer",
        issuer.issuer().as_str(),
        "--auth-audience",
        issuer.audience(),
        "--stop-grace",
        "1",
        "--protocol-timeout",
        "-1",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}
