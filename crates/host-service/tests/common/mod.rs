//! A host under test: the real service (in process, or its binary) against the shared stack, the
//! real Docker engine running the reference mandelbox image, and a token issuer on loopback.
//! Every host gets its own instance id, directories and containers, all removed on drop.

#![allow(dead_code)]

pub mod imds;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use host_service::config::{Args, Config};
use host_service::resources::HostPorts;
use host_service::runtime::docker::DockerRuntime;
use host_service::runtime::{ContainerInfo, ContainerRuntime};
use host_service::{Exit, Running, StartOptions};
use tokio_util::sync::CancellationToken;
use whist_dbclient::{ClaimOutcome, HasuraClient, LiveOptions, ops};
use whist_test_support::jwt::TestIssuer;
use whist_types::{Instance, InstanceStatus, Mandelbox, MandelboxId, MandelboxStatus, NewInstance};

pub const INSTANCE_TYPE: &str = "g4dn.2xlarge";
pub const IMAGE_ID: &str = "ami-host-test";

pub fn db() -> HasuraClient {
    whist_logging::init_for_tests();
    whist_test_support::shared().client()
}

pub use whist_test_support::{eventually, unique};

pub fn fast_live_options() -> LiveOptions {
    LiveOptions {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        keep_alive_interval: Duration::from_secs(2),
        keep_alive_retries: 1,
    }
}

/// How a test host is set up.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub capacity: i32,
    pub extra_args: Vec<String>,
    pub gpus: Option<u32>,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            capacity: 2,
            extra_args: Vec::new(),
            gpus: None,
        }
    }
}

pub struct Host {
    pub instance_id: String,
    pub region: String,
    pub db: HasuraClient,
    pub issuer: Arc<TestIssuer>,
    pub root: PathBuf,
    pub image: String,
    pub options: HostOptions,
    pub docker: DockerRuntime,
    pub running: Option<Running>,
    pub shutdown: CancellationToken,
    pub http: Option<reqwest::Client>,
    pub transport_addr: Option<std::net::SocketAddr>,
    pub ops_addr: Option<std::net::SocketAddr>,
}

impl Host {
    /// Writes the instance row the scaling-service would (PRE_CONNECTION) without starting the
    /// service.
    pub async fn prepare(options: HostOptions) -> Self {
        let db = db();
        let image = tokio::task::spawn_blocking(whist_test_support::reference_mandelbox_image)
            .await
            .expect("join")
            .expect("reference mandelbox image");
        let issuer = Arc::new(TestIssuer::start().await.expect("token issuer"));
        let instance_id = unique("i");
        let region = unique("region");
        db.execute(&ops::insert_instances(&[NewInstance {
            id: instance_id.clone(),
            provider: "AWS".into(),
            region: region.clone(),
            image_id: IMAGE_ID.into(),
            client_sha: "local".into(),
            instance_type: INSTANCE_TYPE.into(),
            remaining_capacity: options.capacity,
            status: InstanceStatus::PreConnection,
            fleet: None,
        }]))
        .await
        .expect("insert instance row");
        let root = std::env::temp_dir().join(format!("whist-host-test-{instance_id}"));
        std::fs::create_dir_all(&root).expect("test dir");
        let docker = DockerRuntime::connect(std::path::Path::new("/var/run/docker.sock"))
            .await
            .expect("docker");
        Self {
            instance_id,
            region,
            db,
            issuer,
            root,
            image,
            options,
            docker,
            running: None,
            shutdown: CancellationToken::new(),
            http: None,
            transport_addr: None,
            ops_addr: None,
        }
    }

    /// Prepares and starts a host whose zygotes are all up.
    pub async fn start(options: HostOptions) -> Self {
        let capacity = options.capacity;
        let mut host = Self::prepare(options).await;
        host.launch().await.expect("host starts");
        host.wait_for_zygotes(capacity as usize).await;
        host
    }

    /// The command line of this host's service (local mode, loopback everything).
    pub fn args(&self) -> Vec<String> {
        let stack = whist_test_support::shared();
        let mut args: Vec<String> = [
            "--local",
            "--environment",
            "local",
            "--instance-id",
            &self.instance_id,
            "--instance-type",
            INSTANCE_TYPE,
            "--image-id",
            IMAGE_ID,
            "--region",
            &self.region,
            "--public-ip",
            "127.0.0.1",
            "--host-commit",
            "local-test-build",
            "--hasura-url",
            &stack.graphql_url,
            "--hasura-websocket-url",
            &stack.websocket_url,
            "--hasura-admin-secret",
            &stack.admin_secret,
            "--mandelbox-image",
            &self.image,
            "--whist-dir",
            &self.root.join("whist").to_string_lossy(),
            "--temp-dir",
            &self.root.join("temp").to_string_lossy(),
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--auth-issuer",
            self.issuer.issuer().as_str(),
            "--auth-audience",
            self.issuer.audience(),
            "--stop-grace",
            "1",
            "--resync-interval",
            "2",
            "--heartbeat-interval",
            "1",
            "--protocol-timeout",
            "-1",
            "--ready-timeout",
            "5",
            "--connect-timeout",
            "30",
            "--drain-deadline",
            "60",
            "--power-off-command",
            "",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        args.extend(self.options.extra_args.iter().cloned());
        args
    }

    pub fn config(&self) -> Config {
        Args::try_parse_from(std::iter::once("host-service".to_owned()).chain(self.args()))
            .expect("arguments parse")
            .validate()
            .expect("configuration is valid")
    }

    /// Starts the service in process.
    pub async fn launch(&mut self) -> Result<(), Exit> {
        self.shutdown = CancellationToken::new();
        let options = StartOptions {
            live: Some(fast_live_options()),
            gpus: self.options.gpus.map(|count| {
                Arc::new(host_service::resources::gpus::FakeGpus::new(count))
                    as Arc<dyn host_service::resources::gpus::GpuInventory>
            }),
        };
        let running = host_service::start(self.config(), options, self.shutdown.clone()).await?;
        let certificate =
            reqwest::Certificate::from_der(&running.certificate_der).expect("certificate");
        self.http = Some(
            reqwest::Client::builder()
                .add_root_certificate(certificate)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        );
        self.transport_addr = Some(running.transport_addr);
        self.ops_addr = Some(running.ops_addr);
        self.running = Some(running);
        Ok(())
    }

    /// Drains the in-process service (as SIGTERM does) and returns how it ended.
    pub async fn stop(&mut self) -> Exit {
        let running = self.running.take().expect("running");
        running.shutdown();
        tokio::time::timeout(Duration::from_secs(60), running.wait())
            .await
            .expect("drains within a minute")
    }

    /// Waits for the service to end on its own (a drain the fleet asked for).
    pub async fn exited(&mut self) -> Exit {
        let running = self.running.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), running.wait())
            .await
            .expect("ends within a minute")
    }

    pub async fn rows(&self) -> Vec<Mandelbox> {
        self.db
            .execute(&ops::mandelboxes_on_instance(&self.instance_id))
            .await
            .expect("rows")
    }

    pub async fn instance(&self) -> Option<Instance> {
        self.db
            .execute(&ops::instance_by_id(&self.instance_id))
            .await
            .expect("instance")
    }

    pub async fn containers(&self) -> Vec<ContainerInfo> {
        self.docker
            .list((
                host_service::mandelbox::labels::INSTANCE_ID,
                &self.instance_id,
            ))
            .await
            .expect("containers")
    }

    /// Waits until exactly `count` WAITING rows exist, each backed by a running container, and
    /// nothing else runs. Returns the zygotes' ids.
    pub async fn wait_for_zygotes(&self, count: usize) -> Vec<MandelboxId> {
        self.wait_for_boxes(count, 0).await
    }

    /// Waits until `waiting` WAITING rows and `live` session rows exist, with exactly one running
    /// container per row.
    pub async fn wait_for_boxes(&self, waiting: usize, live: usize) -> Vec<MandelboxId> {
        eventually(
            &format!("{waiting} zygotes and {live} sessions"),
            Duration::from_secs(60),
            || async {
                let rows = self.rows().await;
                let containers = self.containers().await;
                let zygotes: Vec<_> = rows
                    .iter()
                    .filter(|row| row.status == MandelboxStatus::Waiting)
                    .map(|row| row.id)
                    .collect();
                let sessions = rows
                    .iter()
                    .filter(|row| row.status.is_live_session())
                    .count();
                let running = containers.iter().filter(|c| c.running).count();
                (zygotes.len() == waiting
                    && sessions == live
                    && rows.len() == waiting + live
                    && containers.len() == rows.len()
                    && running == rows.len())
                .then_some(zygotes)
            },
        )
        .await
    }

    /// Claims a WAITING box of this host for `user`, as the scaling-service's assign does.
    pub async fn claim(&self, user: &str) -> MandelboxId {
        let rows = self.rows().await;
        for row in rows
            .iter()
            .filter(|row| row.status == MandelboxStatus::Waiting)
        {
            match self
                .db
                .claim_mandelbox(row.id, user, "1700000000000")
                .await
                .expect("claim")
            {
                ClaimOutcome::Claimed(_) => return row.id,
                other => tracing::info!(?other, "claim lost; trying another"),
            }
        }
        panic!("no WAITING box to claim among {rows:?}");
    }

    pub async fn wait_for_row_gone(&self, id: MandelboxId) {
        eventually(
            &format!("{id}'s row to go"),
            Duration::from_secs(60),
            || async { (!self.rows().await.iter().any(|row| row.id == id)).then_some(()) },
        )
        .await
    }

    pub async fn wait_for_status(&self, id: MandelboxId, status: MandelboxStatus) {
        eventually(
            &format!("{id} to be {status}"),
            Duration::from_secs(30),
            || async {
                self.rows()
                    .await
                    .iter()
                    .any(|row| row.id == id && row.status == status)
                    .then_some(())
            },
        )
        .await
    }

    /// `PUT /json_transport` with an optional bearer token and a raw body.
    pub async fn transport_raw(
        &self,
        token: Option<&str>,
        body: String,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let url = format!(
            "https://127.0.0.1:{}/json_transport",
            self.transport_addr.expect("started").port()
        );
        let mut request = self
            .http
            .as_ref()
            .expect("started")
            .put(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("json_transport answers");
        let status = response.status();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    pub async fn transport(
        &self,
        id: MandelboxId,
        user: &str,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let token = self.issuer.token(user);
        let body = serde_json::json!({
            "mandelbox_id": id.to_string(),
            "json_data": r#"{"dark_mode":true,"desired_timezone":"Europe/Paris"}"#,
            "ip": "127.0.0.1",
        });
        self.transport_raw(Some(&token), body.to_string()).await
    }

    /// A full assignment: claim, CONNECTING, json_transport, RUNNING. Returns the box and its
    /// ports.
    pub async fn start_session(&self, user: &str) -> (MandelboxId, HostPorts) {
        let id = self.claim(user).await;
        self.wait_for_status(id, MandelboxStatus::Connecting).await;
        let (status, body) = self.transport(id, user).await;
        assert_eq!(status, 200, "{body}");
        let ports: HostPorts =
            serde_json::from_value(body["result"].clone()).expect("ports in the reply");
        assert_eq!(body["result"]["aes_key"].as_str().map(str::len), Some(32));
        let row = self.rows().await.into_iter().find(|row| row.id == id);
        assert_eq!(row.map(|row| row.status), Some(MandelboxStatus::Running));
        (id, ports)
    }

    pub async fn get_ops(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.ops_addr.expect("started"));
        let response = reqwest::get(url).await.expect("ops endpoint answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
        }
        // Whatever a failed test left: containers first, then rows, then directories.
        let filter = format!(
            "label={}={}",
            host_service::mandelbox::labels::INSTANCE_ID,
            self.instance_id
        );
        if let Ok(output) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        let _ = whist_test_support::shared().sql(&format!(
            "DELETE FROM whist.mandelboxes WHERE instance_id = '{0}'; DELETE FROM whist.instances WHERE id = '{0}';",
            self.instance_id
        ));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Talks to one of a box's TCP ports on loopback: sends `line`, returns the reply line.
pub fn box_request(port: u16, line: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply)
}

/// Asks a box to end its session (the reference mandelbox exits on `END`).
pub fn end_session(ports: &HostPorts) {
    let reply = box_request(ports.port_32262, "END").expect("box answers END");
    assert_eq!(reply.trim(), "bye");
}

/// A loopback port free right now (for a service binary that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// The host-service binary, run as a separate process.
pub struct ServiceProcess {
    pub child: std::process::Child,
}

impl ServiceProcess {
    pub fn spawn(args: &[String]) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_host-service"))
            .args(args)
            .env("RUST_LOG", "host_service=info")
            .spawn()
            .expect("start the host-service binary");
        Self { child }
    }

    /// The binary with at most `descriptors` open files (as `ulimit -n` sets it).
    pub fn spawn_with_descriptors(args: &[String], descriptors: u32) -> Self {
        let child = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit -n {descriptors} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_host-service"))
            .args(args)
            .env("RUST_LOG", "host_service=info")
            .spawn()
            .expect("start the host-service binary");
        Self { child }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait(mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the service did not exit in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Host {
    /// Once the binary listening on `port` has registered, points the test's HTTP client at
    /// it, trusting exactly the certificate its instance row publishes.
    pub async fn use_pinned_binary_at(&mut self, port: u16, ops_port: u16) -> String {
        let fingerprint = eventually(
            "the host to publish its certificate",
            Duration::from_secs(60),
            || async { self.instance().await.and_then(|row| row.tls_fingerprint) },
        )
        .await;
        let tls = whist_serve::pinned::client_config(&fingerprint).expect("a fingerprint");
        self.http = Some(
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        );
        self.transport_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        self.ops_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], ops_port)));
        fingerprint
    }

    /// Points the test's HTTP client at a service binary listening on `port`; the binary's
    /// certificate is self-signed and unknown to the test, as it is to the scaling-service.
    pub fn use_binary_at(&mut self, port: u16, ops_port: u16) {
        self.http = Some(
            reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
        );
        self.transport_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        self.ops_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], ops_port)));
    }
}
