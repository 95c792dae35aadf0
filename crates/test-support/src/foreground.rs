//! A program run as a terminal runs a foreground job: in a process group of its own, its output
//! read line by line, stopped with Ctrl-C (SIGINT to the whole group). For tests and benchmarks of
//! `make run`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A running foreground job. Dropping it presses Ctrl-C and waits up to a minute.
#[derive(Debug)]
pub struct ForegroundJob {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ForegroundJob {
    /// Starts `command` with its stdout piped (stderr is discarded), in the environment a
    /// developer's shell would give it.
    pub fn start(mut command: Command) -> anyhow::Result<Self> {
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_by_cargo_for_its_child) {
                command.env_remove(&name);
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {command:?}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Reads output until a line starts with `prefix` (leading blanks ignored); returns it.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.trim_start().starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "no line starting with {prefix:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The first word after `label` on a line already read (`  label   value ...`).
    pub fn field(&self, label: &str) -> Option<String> {
        self.seen
            .iter()
            .find_map(|line| line.trim_start().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Ctrl-C: SIGINT to every process of the job's group.
    pub fn interrupt(&self) -> anyhow::Result<()> {
        let group = Pid::from_raw(i32::try_from(self.child.id())?);
        killpg(group, Signal::SIGINT).context("send SIGINT to the process group")
    }

    /// Waits for the job to end.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Variables cargo (and nextest) set for the program they run, describing that program's package.
/// A cargo build nested under such a program would see them, and build scripts that watch them
/// (`ring` watches `CARGO_PKG_NAME`) would rerun: every nested build would then rebuild half the
/// workspace, and the next plain build rebuild it back.
fn set_by_cargo_for_its_child(name: &str) -> bool {
    name == "CARGO"
        || name == "OUT_DIR"
        || [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || name == "CARGO_TARGET_TMPDIR"
}

impl Drop for ForegroundJob {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) && self.interrupt().is_ok() {
            let _ = self.wait(Duration::from_secs(60));
        }
    }
}
