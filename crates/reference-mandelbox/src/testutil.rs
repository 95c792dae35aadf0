//! Helpers for the unit tests: a private resource directory per test and the host's side of
//! the file contract.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::contract;

/// A valid key for [`crate::contract::read_params`].
pub const AES_KEY: &str = "0123456789abcdef0123456789ABCDEF";

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "reference-mandelbox-test-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes the start parameters the way the host does, without `.paramsReady`.
pub fn write_params(dir: &Path, tty: &str, timeout: &str) {
    for (name, value) in [
        (contract::HOST_PORT_FILE, "40123"),
        (contract::TTY_FILE, tty),
        (contract::GPU_INDEX_FILE, "0"),
        (contract::TIMEOUT_FILE, timeout),
    ] {
        fs::write(dir.join(name), format!("{value}\n")).expect("write param");
    }
}

pub fn mark_params_ready(dir: &Path) {
    fs::write(dir.join(contract::PARAMS_READY), "").expect("write .paramsReady");
}
