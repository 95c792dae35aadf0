//! moto's server, a local stand-in for the AWS APIs, as a child process on a loopback port.
//!
//! Tests point their clients at [`Moto::endpoint`] with static credentials and an explicit
//! region; nothing here sets environment variables, so no test can reach the real AWS.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;

use crate::process::{free_port, stop_child, wait_until};

/// The `moto_server` script that `scripts/install-moto.sh` installs, installing it first when
/// absent; the script runs once per process (it returns at once when the install is there).
pub fn moto_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| install().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn install() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("WHIST_MOTO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let script = crate::repo_root().join("scripts/install-moto.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "installing moto failed ({}); run {} by hand",
            output.status,
            script.display()
        );
    }
    let path = String::from_utf8(output.stdout).context("the installer printed a path")?;
    let path = PathBuf::from(path.trim());
    if !path.exists() {
        bail!(
            "the moto installer printed {}, which does not exist",
            path.display()
        );
    }
    Ok(path)
}

/// A running moto server. Dropping it stops the process and removes its log.
#[derive(Debug)]
pub struct Moto {
    port: u16,
    child: Child,
    dir: PathBuf,
    watchdog: Option<Child>,
}

impl Moto {
    /// Installs moto if needed, starts it on a free loopback port and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let binary = moto_binary()?;
        // A port free a moment ago can be taken by another process before moto binds it (the
        // tests start many servers at once): try again on another.
        let mut attempts = 3;
        loop {
            attempts -= 1;
            match Self::start_on(&binary, free_port()?) {
                Err(error) if attempts > 0 && format!("{error:#}").contains("in use") => {}
                result => return result,
            }
        }
    }

    fn start_on(binary: &Path, port: u16) -> anyhow::Result<Self> {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "whist-moto-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let log_path = dir.join("moto.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut child = Command::new(binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let ready = wait_until("moto_server", &mut child, Duration::from_secs(20), || {
            matches!(request(port, "GET", "/moto-api/"), Ok((200, _)))
        });
        if let Err(error) = ready {
            stop_child(&mut child, Signal::SIGTERM, Duration::from_secs(2));
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error.context(format!("moto_server's output:\n{log}")));
        }
        let watchdog = spawn_watchdog(child.id(), &dir).ok();
        Ok(Self {
            port,
            child,
            dir,
            watchdog,
        })
    }

    /// `http://127.0.0.1:PORT`, for a client's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Forgets every resource in every region and service.
    pub fn reset(&self) -> anyhow::Result<()> {
        match request(self.port, "POST", "/moto-api/reset")? {
            (200, _) => Ok(()),
            (status, body) => bail!("moto reset answered {status}: {body}"),
        }
    }

    /// The directory holding `moto.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::SIGTERM, Duration::from_secs(2));
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The moto server this test process shares, started on first use. Statics are never dropped:
/// a watchdog stops the server when the process exits, however it exits.
pub fn shared_moto() -> &'static Moto {
    static SHARED: OnceLock<Moto> = OnceLock::new();
    SHARED.get_or_init(|| {
        Moto::start().unwrap_or_else(|error| panic!("could not start moto: {error:#}"))
    })
}

/// One HTTP/1.1 request without a body on a fresh connection; the status and the body.
fn request(port: u16, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A shell loop that outlives this process only to clean up after it: when this process is
/// gone (even killed), it stops moto and removes its directory.
fn spawn_watchdog(moto_pid: u32, dir: &Path) -> anyhow::Result<Child> {
    let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
kill -TERM "$2" 2>/dev/null
for _ in 1 2 3 4; do kill -0 "$2" 2>/dev/null || break; sleep 0.5; done
kill -KILL "$2" 2>/dev/null; rm -rf "$3""#;
    Command::new("sh")
        .args(["-c", script, "whist-moto-watchdog"])
        .arg(std::process::id().to_string())
        .arg(moto_pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the moto watchdog")
}
