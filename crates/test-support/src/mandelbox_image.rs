//! The reference mandelbox image (`crates/reference-mandelbox`, imported into the local Docker
//! daemon by `scripts/build-reference-mandelbox.sh`), for tests that start real containers.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

use crate::repo_root;

/// How much of the script's stderr a failure carries: the end is where cargo and docker say why.
const STDERR_TAIL_LINES: usize = 40;

/// Builds (or finds up to date) the reference mandelbox image and returns its name.
///
/// The script runs once per process: every later call, from any thread, returns the first
/// result, failures included, so a broken build is reported once rather than retried per test.
pub fn reference_mandelbox_image() -> Result<String> {
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build() -> Result<String> {
    let root = repo_root();
    let script = root.join("scripts/build-reference-mandelbox.sh");
    let output = Command::new("bash")
        .arg(&script)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
        bail!("{} failed ({}):\n{tail}", script.display(), output.status);
    }
    // The script's contract: the image name is the last line of stdout.
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("{} printed no image name", script.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs Docker; run with `cargo test -p whist-test-support -- --ignored`.
    #[test]
    #[ignore = "needs a Docker daemon"]
    fn builds_the_image_once() {
        let image = reference_mandelbox_image().expect("image builds");
        assert_eq!(image, "whist/reference-mandelbox:current-build");
        assert_eq!(reference_mandelbox_image().expect("cached"), image);
    }
}
