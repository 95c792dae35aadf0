//! The Hasura-dialect GraphQL engine (`postrust-server`) as a child process.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::process::{free_port, stop_child, wait_until};

/// The engine version the scripts install.
const ENGINE_VERSION: &str = "3.1.0";

/// The engine binary: `WHIST_ENGINE_BIN`, else the per-machine cache that
/// `scripts/install-postrust.sh` fills (installing it there first when absent).
pub fn engine_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("WHIST_ENGINE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let cache = match std::env::var_os("WHIST_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache"))
                });
            base.context("neither HOME nor XDG_CACHE_HOME is set")?
                .join("whist-fleet")
        }
    };
    let binary = cache.join(format!("postrust-{ENGINE_VERSION}/bin/postrust"));
    if binary.exists() {
        return Ok(binary);
    }
    let script = crate::repo_root().join("scripts/install-postrust.sh");
    eprintln!(
        "the GraphQL engine is not installed yet; running {} (several minutes, once)",
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .stdout(Stdio::null())
        .status()
        .context("run the engine installer")?;
    if !status.success() || !binary.exists() {
        bail!(
            "installing the GraphQL engine failed ({status}); run {} by hand",
            script.display()
        );
    }
    Ok(binary)
}

/// How to run the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub binary: PathBuf,
    pub database_url: String,
    pub admin_secret: String,
    /// `PGRST_GRAPHQL_NAMES`, from the shipped metadata.
    pub names_json: String,
    /// The floor under notifications: how often every live query re-reads (whole seconds).
    pub subscription_refresh_seconds: u64,
    /// Where the engine's output goes.
    pub log_file: PathBuf,
    /// The loopback port to serve on; a free one when `None`.
    pub port: Option<u16>,
}

/// A running engine. Dropping it stops the process.
#[derive(Debug)]
pub struct Engine {
    options: EngineOptions,
    port: u16,
    child: Option<Child>,
}

impl Engine {
    /// Starts the engine on its loopback port (a free one unless the options name one) and
    /// waits until it answers GraphQL.
    pub fn start(options: EngineOptions) -> anyhow::Result<Self> {
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let mut engine = Self {
            options,
            port,
            child: None,
        };
        engine.spawn()?;
        Ok(engine)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn graphql_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/graphql", self.port)
    }

    /// The local engine serves live queries at `/v1/graphql/ws` (Hasura: `/v1/graphql`).
    pub fn websocket_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/graphql/ws", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the process; live-query clients see their connections drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Signal::SIGTERM, Duration::from_secs(5));
        }
    }

    /// Starts the process again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.options.log_file)
            .with_context(|| format!("open {}", self.options.log_file.display()))?;
        let mut child = Command::new(&self.options.binary)
            .env("PGRST_DB_URI", &self.options.database_url)
            .env("PGRST_DB_SCHEMAS", "public,whist,config")
            .env("PGRST_DB_ANON_ROLE", "postgres")
            .env("PGRST_DB_POOL", "40")
            .env("HASURA_GRAPHQL_ADMIN_SECRET", &self.options.admin_secret)
            .env("PGRST_SERVER_HOST", "127.0.0.1")
            .env("PGRST_SERVER_PORT", self.port.to_string())
            .env(
                "PGRST_SUBSCRIPTION_REFRESH",
                self.options.subscription_refresh_seconds.to_string(),
            )
            .env("PGRST_GRAPHQL_NAMES", &self.options.names_json)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Out of the terminal's process group, as Postgres is: its owner stops it in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", self.options.binary.display()))?;
        let port = self.port;
        let secret = self.options.admin_secret.clone();
        wait_until(
            "the GraphQL engine",
            &mut child,
            Duration::from_secs(30),
            || answers_graphql(port, &secret),
        )
        .with_context(|| format!("see {}", self.options.log_file.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn log_file(&self) -> &Path {
        &self.options.log_file
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the engine answers a trivial GraphQL query with data (plain HTTP over std, so the
/// stack needs no async runtime).
fn answers_graphql(port: u16, admin_secret: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let body = r#"{"query":"query { whist_instances(limit: 0) { id } }"}"#;
    let request = format!(
        "POST /v1/graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         x-hasura-admin-secret: {admin_secret}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("\"whist_instances\"")
}
