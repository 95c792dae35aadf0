//! One mandelbox as the host makes it: where its files live, what its container looks like, and
//! the files the in-box programs read. This module is the in-container contract; mandelbox images
//! depend on every name in it.

pub mod files;
pub mod spec;

use std::path::{Path, PathBuf};

use whist_types::MandelboxId;

/// Container labels: they tie a container to its mandelbox and instance and carry what a
/// restarted host-service needs to adopt it.
pub mod labels {
    pub const MANAGED_BY: &str = "whist.managed-by";
    pub const MANAGED_BY_VALUE: &str = "host-service";
    pub const INSTANCE_ID: &str = "whist.instance-id";
    pub const MANDELBOX_ID: &str = "whist.mandelbox-id";
    pub const HOST_PORTS: &str = "whist.host-ports";
    pub const TTY: &str = "whist.tty";
    pub const GPU_INDEX: &str = "whist.gpu-index";
    pub const SERVER_SESSION_ID: &str = "whist.server-session-id";
}

/// The host paths of one mandelbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxPaths {
    /// `<whist>/<id>/`: removed with the mandelbox.
    pub root: PathBuf,
    /// `<whist>/<id>/mandelboxResourceMappings/`, mounted at `/whist/resourceMappings`.
    pub resources: PathBuf,
    /// `<temp>/<id>/sockets/`, mounted at `/tmp/sockets`.
    pub sockets: PathBuf,
    /// `<temp>/logs/<id>/<server session>/`, mounted at `/var/log/whist`; kept after the
    /// mandelbox ends so the log shipper can finish with it.
    pub logs: PathBuf,
}

impl BoxPaths {
    pub fn new(
        whist_dir: &Path,
        temp_dir: &Path,
        id: MandelboxId,
        server_session_id: &str,
    ) -> Self {
        let id = id.to_string();
        let root = whist_dir.join(&id);
        Self {
            resources: root.join("mandelboxResourceMappings"),
            root,
            sockets: temp_dir.join(&id).join("sockets"),
            logs: temp_dir.join("logs").join(&id).join(server_session_id),
        }
    }

    /// The socket the in-box protocol server receives its input devices on.
    pub fn uinput_socket(&self) -> PathBuf {
        self.sockets.join("uinput.sock")
    }

    /// Removes what belongs to this mandelbox alone (not its logs).
    pub fn remove(&self) {
        for dir in [&self.root, self.sockets.parent().unwrap_or(&self.sockets)] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(path = %dir.display(), %error, "remove mandelbox directory")
                }
            }
        }
    }
}

/// A random id for this run of a mandelbox, naming its log directory.
pub fn new_server_session_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// 16 random bytes as 32 hex characters: the key the client and the box share.
pub fn new_aes_key() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source is available");
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_contract_layout() {
        let id: MandelboxId = "6f9619ff-8b86-d011-b42d-00cf4fc964ff".parse().expect("id");
        let paths = BoxPaths::new(Path::new("/whist"), Path::new("/whist/temp"), id, "s1");
        assert_eq!(
            paths.resources,
            Path::new("/whist/6f9619ff-8b86-d011-b42d-00cf4fc964ff/mandelboxResourceMappings")
        );
        assert_eq!(
            paths.uinput_socket(),
            Path::new("/whist/temp/6f9619ff-8b86-d011-b42d-00cf4fc964ff/sockets/uinput.sock")
        );
        assert_eq!(
            paths.logs,
            Path::new("/whist/temp/logs/6f9619ff-8b86-d011-b42d-00cf4fc964ff/s1")
        );
    }

    #[test]
    fn keys_are_32_hex_characters_and_differ() {
        let (a, b) = (new_aes_key(), new_aes_key());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
