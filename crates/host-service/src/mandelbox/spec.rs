//! The container a mandelbox runs in, exactly as the in-box programs expect it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use whist_types::{Environment, MandelboxId};

use super::{BoxPaths, labels};
use crate::config::MandelboxConfig;
use crate::resources::HostPorts;
use crate::runtime::{Bind, ContainerSpec};

/// Docker's default capabilities plus what the protocol server needs (SYS_NICE for real-time
/// priorities, IPC_LOCK for locked audio/video buffers). Everything else is dropped.
const CAPABILITIES: [&str; 16] = [
    "SETPCAP",
    "MKNOD",
    "AUDIT_WRITE",
    "CHOWN",
    "NET_RAW",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "SETFCAP",
    "SYS_NICE",
    "IPC_LOCK",
];

/// A relative CPU weight equal to Docker's default, so boxes share the CPU evenly.
const CPU_SHARES: i64 = 1024;

/// What one mandelbox was given.
#[derive(Debug, Clone)]
pub struct BoxResources {
    pub ports: HostPorts,
    pub tty: u8,
    /// The host GPU this box may use, if the host has GPUs.
    pub gpu: Option<u32>,
    /// `/dev/input/eventN` nodes of the box's virtual input devices.
    pub input_devices: Vec<PathBuf>,
}

/// Host facts the spec depends on.
#[derive(Debug, Clone)]
pub struct HostFeatures {
    pub apparmor: bool,
    pub fuse: bool,
    pub cgroup_dir: bool,
    pub udev_data: bool,
}

impl HostFeatures {
    pub fn detect() -> Self {
        Self {
            apparmor: std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
                .is_ok_and(|enabled| enabled.trim() == "Y"),
            fuse: Path::new("/dev/fuse").exists(),
            cgroup_dir: Path::new("/sys/fs/cgroup").is_dir(),
            udev_data: Path::new("/run/udev/data").is_dir(),
        }
    }
}

/// Everything that names one mandelbox.
#[derive(Debug, Clone)]
pub struct BoxIdentity<'a> {
    pub id: MandelboxId,
    pub instance_id: &'a str,
    pub server_session_id: &'a str,
    pub aes_key: &'a str,
    pub environment: Environment,
}

/// The container name: the app with every character Docker refuses replaced, then the id
/// (`browsers/whistium` → `browsers-whistium-<id>`).
pub fn container_name(app: &str, id: MandelboxId) -> String {
    let app: String = app
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{app}-{id}")
}

pub fn container_spec(
    config: &MandelboxConfig,
    host: &HostFeatures,
    identity: &BoxIdentity<'_>,
    paths: &BoxPaths,
    resources: &BoxResources,
) -> ContainerSpec {
    let mut env = vec![
        format!("WHIST_AES_KEY={}", identity.aes_key),
        format!("SENTRY_ENV={}", identity.environment),
    ];
    if let Some(gpu) = resources.gpu {
        // Only the box's own GPU is visible; inside, the runtime numbers it 0.
        env.push(format!("NVIDIA_VISIBLE_DEVICES={gpu}"));
        env.push("NVIDIA_DRIVER_CAPABILITIES=all".to_owned());
    }

    let display = |path: &Path| path.to_string_lossy().into_owned();
    let mut binds = vec![
        Bind {
            host: display(&paths.resources),
            container: "/whist/resourceMappings".to_owned(),
            read_only: false,
        },
        Bind {
            host: display(&paths.sockets),
            container: "/tmp/sockets".to_owned(),
            read_only: false,
        },
        Bind {
            host: display(&paths.logs),
            container: "/var/log/whist".to_owned(),
            read_only: false,
        },
    ];
    if host.cgroup_dir {
        binds.insert(0, read_only_bind("/sys/fs/cgroup"));
    }
    if host.udev_data {
        binds.push(read_only_bind("/run/udev/data"));
    }

    let mut devices: Vec<String> = resources.input_devices.iter().map(|p| display(p)).collect();
    if host.fuse {
        devices.push("/dev/fuse".to_owned());
    }

    let mut labels = BTreeMap::from([
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
        (
            labels::INSTANCE_ID.to_owned(),
            identity.instance_id.to_owned(),
        ),
        (labels::MANDELBOX_ID.to_owned(), identity.id.to_string()),
        (
            labels::HOST_PORTS.to_owned(),
            format_ports(&resources.ports),
        ),
        (labels::TTY.to_owned(), resources.tty.to_string()),
        (
            labels::SERVER_SESSION_ID.to_owned(),
            identity.server_session_id.to_owned(),
        ),
    ]);
    if let Some(gpu) = resources.gpu {
        labels.insert(labels::GPU_INDEX.to_owned(), gpu.to_string());
    }

    ContainerSpec {
        name: container_name(&config.app, identity.id),
        image: config.image.clone(),
        labels,
        env,
        ports: resources.ports,
        binds,
        devices,
        capabilities: CAPABILITIES.to_vec(),
        memory_bytes: config.memory_bytes,
        shm_bytes: config.shm_bytes,
        pids_limit: config.pids_limit,
        cpu_shares: CPU_SHARES,
        tmpfs: vec![("/run", "size=52428800"), ("/run/lock", "size=52428800")],
        security_options: if host.apparmor {
            vec![format!("apparmor:{}", config.apparmor_profile)]
        } else {
            Vec::new()
        },
    }
}

fn read_only_bind(path: &str) -> Bind {
    Bind {
        host: path.to_owned(),
        container: path.to_owned(),
        read_only: true,
    }
}

/// `32261,32262,32263,32273` host ports, in that order, for the adoption label.
pub fn format_ports(ports: &HostPorts) -> String {
    format!(
        "{},{},{},{}",
        ports.port_32261, ports.port_32262, ports.port_32263, ports.port_32273
    )
}

pub fn parse_ports(text: &str) -> Option<HostPorts> {
    let mut numbers = text.split(',').map(|part| part.trim().parse::<u16>().ok());
    let ports = HostPorts {
        port_32261: numbers.next()??,
        port_32262: numbers.next()??,
        port_32263: numbers.next()??,
        port_32273: numbers.next()??,
    };
    numbers.next().is_none().then_some(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MandelboxConfig {
        MandelboxConfig {
            image: "browsers/whistium:current-build".into(),
            app: "browsers/whistium".into(),
            memory_bytes: 6_552_550_944,
            shm_bytes: 2_147_483_648,
            pids_limit: 4096,
            protocol_timeout: 30,
            whist_dir: "/whist".into(),
            temp_dir: "/whist/temp".into(),
            uinput_path: "/dev/uinput".into(),
            apparmor_profile: "mandelbox-apparmor-profile".into(),
        }
    }

    fn resources(gpu: Option<u32>) -> BoxResources {
        BoxResources {
            ports: HostPorts {
                port_32261: 40001,
                port_32262: 40002,
                port_32263: 40003,
                port_32273: 40004,
            },
            tty: 10,
            gpu,
            input_devices: vec!["/dev/input/event7".into()],
        }
    }

    fn spec(host: HostFeatures, gpu: Option<u32>) -> ContainerSpec {
        let id: MandelboxId = "6f9619ff-8b86-d011-b42d-00cf4fc964ff".parse().expect("id");
        let paths = BoxPaths::new(Path::new("/whist"), Path::new("/whist/temp"), id, "s1");
        let identity = BoxIdentity {
            id,
            instance_id: "i-1",
            server_session_id: "s1",
            aes_key: "00112233445566778899aabbccddeeff",
            environment: Environment::Prod,
        };
        container_spec(&config(), &host, &identity, &paths, &resources(gpu))
    }

    fn all_features() -> HostFeatures {
        HostFeatures {
            apparmor: true,
            fuse: true,
            cgroup_dir: true,
            udev_data: true,
        }
    }

    #[test]
    fn the_spec_follows_the_contract() {
        let spec = spec(all_features(), Some(2));
        assert_eq!(
            spec.name,
            "browsers-whistium-6f9619ff-8b86-d011-b42d-00cf4fc964ff"
        );
        assert!(
            spec.env
                .contains(&"WHIST_AES_KEY=00112233445566778899aabbccddeeff".to_owned())
        );
        assert!(spec.env.contains(&"SENTRY_ENV=prod".to_owned()));
        assert!(spec.env.contains(&"NVIDIA_VISIBLE_DEVICES=2".to_owned()));
        let binds: Vec<_> = spec
            .binds
            .iter()
            .map(|b| (b.container.as_str(), b.read_only))
            .collect();
        assert_eq!(
            binds,
            [
                ("/sys/fs/cgroup", true),
                ("/whist/resourceMappings", false),
                ("/tmp/sockets", false),
                ("/var/log/whist", false),
                ("/run/udev/data", true),
            ]
        );
        assert_eq!(spec.devices, ["/dev/input/event7", "/dev/fuse"]);
        assert!(spec.capabilities.contains(&"SYS_NICE"));
        assert!(spec.capabilities.contains(&"IPC_LOCK"));
        assert_eq!(spec.shm_bytes, 2_147_483_648);
        assert_eq!(
            spec.security_options,
            ["apparmor:mandelbox-apparmor-profile"]
        );
        assert_eq!(spec.labels[labels::GPU_INDEX], "2");
        assert_eq!(
            parse_ports(&spec.labels[labels::HOST_PORTS]),
            Some(spec.ports)
        );
    }

    #[test]
    fn absent_host_features_are_left_out() {
        let spec = spec(
            HostFeatures {
                apparmor: false,
                fuse: false,
                cgroup_dir: false,
                udev_data: false,
            },
            None,
        );
        assert!(spec.security_options.is_empty());
        assert_eq!(spec.devices, ["/dev/input/event7"]);
        assert_eq!(spec.binds.len(), 3);
        assert!(!spec.env.iter().any(|e| e.starts_with("NVIDIA")));
        assert!(!spec.labels.contains_key(labels::GPU_INDEX));
    }

    #[test]
    fn port_labels_round_trip_and_refuse_garbage() {
        assert_eq!(parse_ports("1,2,3"), None);
        assert_eq!(parse_ports("1,2,3,4,5"), None);
        assert_eq!(parse_ports("1,2,x,4"), None);
        assert!(parse_ports("1025,1026,1027,1028").is_some());
    }
}
