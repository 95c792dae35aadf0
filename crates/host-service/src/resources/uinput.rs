//! Virtual input devices for one mandelbox, and handing them into it.
//!
//! Each mandelbox gets three uinput devices (an absolute pointer, a relative
//! pointer and a keyboard). Their `/dev/input/eventN` nodes are given to the
//! container so its X server reads them; the uinput file descriptors, through
//! which events are injected, are passed to the protocol server inside the box
//! over a Unix socket (SCM_RIGHTS), one connection, one message.
//!
//! Devices are set up through the legacy uinput interface: `UI_SET_*BIT`
//! ioctls, then one `write` of a `struct uinput_user_dev`, then
//! `UI_DEV_CREATE`. The struct is serialized by hand so that no unsafe code is
//! needed for it.

// Unsafe code is allowed here because ioctls have no safe interface: each call
// site passes an fd kept open by a borrowed `File` and, for UI_GET_SYSNAME, a
// buffer whose length is encoded in the request. The tests also adopt fds
// received over SCM_RIGHTS, which only `FromRawFd` can do.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::libc::c_int;
use nix::sys::ioctl::ioctl_num_type;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::ResourceError;

/// Where the uinput device usually is.
pub const DEFAULT_UINPUT_PATH: &str = "/dev/uinput";

/// Where the kernel lists input devices by sysname.
const SYS_INPUT_DIR: &str = "/sys/devices/virtual/input";

/// Where udev puts event device nodes.
const DEV_INPUT_DIR: &str = "/dev/input";

/// How long udev gets to create the `/dev/input/eventN` nodes after
/// `UI_DEV_CREATE`: the kernel registers the device at once, but the node the
/// container needs appears asynchronously, and Docker fails to create a
/// container whose device node does not exist yet.
const UDEV_SETTLE: Duration = Duration::from_millis(200);

/// Request codes, spelled like `<linux/uinput.h>` (magic 'U').
mod request {
    use super::{c_int, ioctl_num_type};

    pub const UI_DEV_CREATE: ioctl_num_type = nix::request_code_none!(b'U', 1);
    pub const UI_DEV_DESTROY: ioctl_num_type = nix::request_code_none!(b'U', 2);
    pub const UI_SET_EVBIT: ioctl_num_type =
        nix::request_code_write!(b'U', 100, size_of::<c_int>());
    pub const UI_SET_KEYBIT: ioctl_num_type =
        nix::request_code_write!(b'U', 101, size_of::<c_int>());
    pub const UI_SET_RELBIT: ioctl_num_type =
        nix::request_code_write!(b'U', 102, size_of::<c_int>());
    pub const UI_SET_ABSBIT: ioctl_num_type =
        nix::request_code_write!(b'U', 103, size_of::<c_int>());
    pub const UI_SET_PROPBIT: ioctl_num_type =
        nix::request_code_write!(b'U', 110, size_of::<c_int>());
    /// `UI_GET_SYSNAME(len)` encodes the buffer length; `ui_get_sysname` below
    /// takes it from the slice it is given.
    pub const UI_GET_SYSNAME_NR: u8 = 44;
}

nix::ioctl_none_bad!(ui_dev_create, request::UI_DEV_CREATE);
nix::ioctl_none_bad!(ui_dev_destroy, request::UI_DEV_DESTROY);
nix::ioctl_write_int_bad!(ui_set_evbit, request::UI_SET_EVBIT);
nix::ioctl_write_int_bad!(ui_set_keybit, request::UI_SET_KEYBIT);
nix::ioctl_write_int_bad!(ui_set_relbit, request::UI_SET_RELBIT);
nix::ioctl_write_int_bad!(ui_set_absbit, request::UI_SET_ABSBIT);
nix::ioctl_write_int_bad!(ui_set_propbit, request::UI_SET_PROPBIT);
nix::ioctl_read_buf!(ui_get_sysname, b'U', request::UI_GET_SYSNAME_NR, u8);

/// Event types and codes from `<linux/input-event-codes.h>`.
mod codes {
    pub const EV_SYN: u16 = 0x00;
    pub const EV_KEY: u16 = 0x01;
    pub const EV_REL: u16 = 0x02;
    pub const EV_ABS: u16 = 0x03;

    pub const BTN_LEFT: u16 = 0x110;
    pub const BTN_RIGHT: u16 = 0x111;
    pub const BTN_MIDDLE: u16 = 0x112;
    pub const BTN_SIDE: u16 = 0x113;
    pub const BTN_EXTRA: u16 = 0x114;
    pub const BTN_TOOL_PEN: u16 = 0x140;
    pub const BTN_TOUCH: u16 = 0x14a;
    pub const BTN_STYLUS: u16 = 0x14b;
    /// Keys 0..=LAST_KEY; KEY_MAX itself (0x2ff) is left out.
    pub const LAST_KEY: u16 = 0x2fe;

    pub const REL_X: u16 = 0x00;
    pub const REL_Y: u16 = 0x01;
    pub const REL_HWHEEL: u16 = 0x06;
    pub const REL_WHEEL: u16 = 0x08;
    pub const REL_WHEEL_HI_RES: u16 = 0x0b;
    pub const REL_HWHEEL_HI_RES: u16 = 0x0c;

    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;

    pub const INPUT_PROP_POINTER: u16 = 0x00;

    pub const BUS_USB: u16 = 0x03;
}

/// Vendor id of all Whist virtual devices.
const VENDOR: u16 = 0xF4C1;
/// Device version of all Whist virtual devices.
const VERSION: u16 = 1;

/// Largest value of the absolute device's axes (its minimum is 0).
const ABS_AXIS_MAX: i32 = 0xFFF;

/// An absolute axis and its range.
#[derive(Debug, Clone, Copy)]
struct AbsAxis {
    code: u16,
    min: i32,
    max: i32,
}

/// What one virtual device is and which events it can send.
#[derive(Debug, Clone)]
struct DeviceSpec {
    name: &'static str,
    product: u16,
    keys: Vec<u16>,
    rel_axes: &'static [u16],
    abs_axes: &'static [AbsAxis],
    properties: &'static [u16],
}

impl DeviceSpec {
    fn absolute() -> Self {
        use codes::*;
        DeviceSpec {
            name: "Whist Virtual Absolute Input",
            product: 0x1124,
            keys: vec![BTN_TOUCH, BTN_TOOL_PEN, BTN_STYLUS],
            rel_axes: &[],
            abs_axes: &[
                AbsAxis {
                    code: ABS_X,
                    min: 0,
                    max: ABS_AXIS_MAX,
                },
                AbsAxis {
                    code: ABS_Y,
                    min: 0,
                    max: ABS_AXIS_MAX,
                },
            ],
            properties: &[INPUT_PROP_POINTER],
        }
    }

    fn relative() -> Self {
        use codes::*;
        DeviceSpec {
            name: "Whist Virtual Relative Input",
            product: 0x1123,
            keys: vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA],
            rel_axes: &[
                REL_X,
                REL_Y,
                REL_HWHEEL,
                REL_WHEEL,
                REL_WHEEL_HI_RES,
                REL_HWHEEL_HI_RES,
            ],
            abs_axes: &[],
            properties: &[],
        }
    }

    fn keyboard() -> Self {
        DeviceSpec {
            name: "Whist Virtual Keyboard",
            product: 0x1122,
            keys: (0..=codes::LAST_KEY).collect(),
            rel_axes: &[],
            abs_axes: &[],
            properties: &[],
        }
    }

    /// The event types to enable: always EV_SYN, plus one per kind of code.
    fn event_types(&self) -> Vec<u16> {
        let mut types = vec![codes::EV_SYN];
        if !self.keys.is_empty() {
            types.push(codes::EV_KEY);
        }
        if !self.rel_axes.is_empty() {
            types.push(codes::EV_REL);
        }
        if !self.abs_axes.is_empty() {
            types.push(codes::EV_ABS);
        }
        types
    }

    fn user_dev(&self) -> UserDev {
        let mut dev = UserDev {
            name: [0; UINPUT_MAX_NAME_SIZE],
            id: InputId {
                bustype: codes::BUS_USB,
                vendor: VENDOR,
                product: self.product,
                version: VERSION,
            },
            ff_effects_max: 0,
            absmax: [0; ABS_CNT],
            absmin: [0; ABS_CNT],
            absfuzz: [0; ABS_CNT],
            absflat: [0; ABS_CNT],
        };
        // Keep at least one NUL: the kernel reads a C string.
        let name = self.name.as_bytes();
        let len = name.len().min(UINPUT_MAX_NAME_SIZE - 1);
        dev.name[..len].copy_from_slice(&name[..len]);
        for axis in self.abs_axes {
            dev.absmin[usize::from(axis.code)] = axis.min;
            dev.absmax[usize::from(axis.code)] = axis.max;
        }
        dev
    }
}

const UINPUT_MAX_NAME_SIZE: usize = 80;
const ABS_CNT: usize = 64;
/// `sizeof(struct uinput_user_dev)`: name, input_id (4 × u16),
/// ff_effects_max (u32), then four arrays of ABS_CNT i32. No padding: every
/// field starts on a multiple of its alignment.
const USER_DEV_SIZE: usize = UINPUT_MAX_NAME_SIZE + 4 * 2 + 4 + 4 * ABS_CNT * 4;

/// `struct input_id`.
#[derive(Debug, Clone, Copy)]
struct InputId {
    bustype: u16,
    vendor: u16,
    product: u16,
    version: u16,
}

/// `struct uinput_user_dev`, the legacy setup record written to uinput.
#[derive(Debug, Clone)]
struct UserDev {
    name: [u8; UINPUT_MAX_NAME_SIZE],
    id: InputId,
    ff_effects_max: u32,
    absmax: [i32; ABS_CNT],
    absmin: [i32; ABS_CNT],
    absfuzz: [i32; ABS_CNT],
    absflat: [i32; ABS_CNT],
}

impl UserDev {
    /// The struct's bytes as the kernel reads them (native endianness).
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(USER_DEV_SIZE);
        bytes.extend_from_slice(&self.name);
        for half in [
            self.id.bustype,
            self.id.vendor,
            self.id.product,
            self.id.version,
        ] {
            bytes.extend_from_slice(&half.to_ne_bytes());
        }
        bytes.extend_from_slice(&self.ff_effects_max.to_ne_bytes());
        for array in [&self.absmax, &self.absmin, &self.absfuzz, &self.absflat] {
            for value in array {
                bytes.extend_from_slice(&value.to_ne_bytes());
            }
        }
        debug_assert_eq!(bytes.len(), USER_DEV_SIZE);
        bytes
    }
}

fn uinput_error(operation: &'static str, source: impl Into<io::Error>) -> ResourceError {
    ResourceError::Uinput {
        operation,
        source: source.into(),
    }
}

/// Opens uinput the way device setup needs it: write-only, non-blocking.
fn open_uinput(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
}

/// Whether uinput devices can be created through `path` (it exists and this
/// process may open it for writing).
pub fn uinput_available(path: &Path) -> bool {
    open_uinput(path).is_ok()
}

/// One of the `UI_SET_*BIT` ioctls.
type SetBitIoctl = unsafe fn(c_int, c_int) -> nix::Result<c_int>;

fn set_bits(
    file: &File,
    ioctl: SetBitIoctl,
    operation: &'static str,
    codes: impl IntoIterator<Item = u16>,
) -> Result<(), ResourceError> {
    for code in codes {
        // SAFETY: the UI_SET_*BIT ioctls take their argument by value and
        // touch no user memory; `file` keeps the fd open during the call.
        unsafe { ioctl(file.as_raw_fd(), c_int::from(code)) }
            .map_err(|errno| uinput_error(operation, errno))?;
    }
    Ok(())
}

/// A uinput device the kernel has created; destroyed on drop.
#[derive(Debug)]
struct LiveDevice {
    file: File,
    name: &'static str,
}

impl LiveDevice {
    /// Sets up and creates one device. On error nothing is left behind:
    /// closing a uinput fd whose device was never created frees everything.
    fn create(uinput: &Path, spec: &DeviceSpec) -> Result<LiveDevice, ResourceError> {
        let file = open_uinput(uinput).map_err(|source| uinput_error("open uinput", source))?;
        set_bits(&file, ui_set_evbit, "UI_SET_EVBIT", spec.event_types())?;
        set_bits(
            &file,
            ui_set_keybit,
            "UI_SET_KEYBIT",
            spec.keys.iter().copied(),
        )?;
        set_bits(
            &file,
            ui_set_relbit,
            "UI_SET_RELBIT",
            spec.rel_axes.iter().copied(),
        )?;
        set_bits(
            &file,
            ui_set_absbit,
            "UI_SET_ABSBIT",
            spec.abs_axes.iter().map(|axis| axis.code),
        )?;
        set_bits(
            &file,
            ui_set_propbit,
            "UI_SET_PROPBIT",
            spec.properties.iter().copied(),
        )?;
        (&file)
            .write_all(&spec.user_dev().to_bytes())
            .map_err(|source| uinput_error("write uinput_user_dev", source))?;
        // SAFETY: UI_DEV_CREATE takes no argument; `file` keeps the fd open.
        unsafe { ui_dev_create(file.as_raw_fd()) }
            .map_err(|errno| uinput_error("UI_DEV_CREATE", errno))?;
        tracing::debug!(name = spec.name, "created uinput device");
        Ok(LiveDevice {
            file,
            name: spec.name,
        })
    }

    /// The kernel's name for the device, e.g. "input23".
    fn sysname(&self) -> Result<String, ResourceError> {
        let mut buf = [0u8; 64];
        // SAFETY: the request encodes `buf.len()`, so the kernel writes at
        // most that many bytes into `buf`, which outlives the call; `file`
        // keeps the fd open.
        unsafe { ui_get_sysname(self.file.as_raw_fd(), &mut buf) }
            .map_err(|errno| uinput_error("UI_GET_SYSNAME", errno))?;
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8(buf[..len].to_vec()).map_err(|error| {
            uinput_error(
                "UI_GET_SYSNAME",
                io::Error::new(io::ErrorKind::InvalidData, error),
            )
        })
    }
}

impl Drop for LiveDevice {
    /// Destroys the device explicitly: the fd has been passed into the
    /// container, whose copy would otherwise keep the device alive.
    fn drop(&mut self) {
        // SAFETY: UI_DEV_DESTROY takes no argument; `file` keeps the fd open.
        if let Err(errno) = unsafe { ui_dev_destroy(self.file.as_raw_fd()) } {
            tracing::warn!(name = self.name, %errno, "UI_DEV_DESTROY failed");
        }
    }
}

/// Finds the `eventN` entry of an input device's sysfs directory and returns
/// the matching `/dev/input/eventN`.
fn event_node_in(sys_dir: &Path) -> Result<PathBuf, ResourceError> {
    let entries = std::fs::read_dir(sys_dir)
        .map_err(|source| uinput_error("list the sysfs input device", source))?;
    for entry in entries {
        let entry = entry.map_err(|source| uinput_error("list the sysfs input device", source))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_event = name
            .strip_prefix("event")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_event {
            return Ok(Path::new(DEV_INPUT_DIR).join(name));
        }
    }
    Err(uinput_error(
        "find the event node",
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no event* entry in {}", sys_dir.display()),
        ),
    ))
}

/// A created device and its event node.
#[derive(Debug)]
struct UinputDevice {
    live: LiveDevice,
    node: PathBuf,
}

impl UinputDevice {
    fn resolve(live: LiveDevice) -> Result<UinputDevice, ResourceError> {
        let sysname = live.sysname()?;
        let node = event_node_in(&Path::new(SYS_INPUT_DIR).join(&sysname))?;
        if !node.exists() {
            // Not fatal here: the node may still appear, and Docker reports
            // clearly if it does not.
            tracing::warn!(name = live.name, node = %node.display(), "event node does not exist yet");
        }
        Ok(UinputDevice { live, node })
    }
}

/// The three virtual input devices of one mandelbox. Dropping this destroys
/// them.
#[derive(Debug)]
pub struct UinputDevices {
    absolute: UinputDevice,
    relative: UinputDevice,
    keyboard: UinputDevice,
}

impl UinputDevices {
    /// Creates the absolute pointer, relative pointer and keyboard through the
    /// uinput device at `uinput`. All or none: on error the devices created so
    /// far are destroyed.
    ///
    /// Blocks for about 200 ms (see `UDEV_SETTLE`); call it from
    /// `spawn_blocking` in async code.
    pub fn create(uinput: &Path) -> Result<Self, ResourceError> {
        let absolute = LiveDevice::create(uinput, &DeviceSpec::absolute())?;
        let relative = LiveDevice::create(uinput, &DeviceSpec::relative())?;
        let keyboard = LiveDevice::create(uinput, &DeviceSpec::keyboard())?;
        // One wait for all three nodes rather than one per device.
        std::thread::sleep(UDEV_SETTLE);
        let devices = UinputDevices {
            absolute: UinputDevice::resolve(absolute)?,
            relative: UinputDevice::resolve(relative)?,
            keyboard: UinputDevice::resolve(keyboard)?,
        };
        tracing::info!(nodes = ?devices.device_nodes(), "created uinput devices");
        Ok(devices)
    }

    /// The `/dev/input/eventN` nodes, in [absolute, relative, keyboard] order.
    pub fn device_nodes(&self) -> [&Path; 3] {
        [
            &self.absolute.node,
            &self.relative.node,
            &self.keyboard.node,
        ]
        .map(PathBuf::as_path)
    }

    /// The uinput fds, in [absolute, relative, keyboard] order, for
    /// [`serve_device_fds`].
    pub fn fds(&self) -> [BorrowedFd<'_>; 3] {
        [&self.absolute, &self.relative, &self.keyboard].map(|device| device.live.file.as_fd())
    }
}

fn fd_error(operation: &'static str, source: io::Error) -> ResourceError {
    ResourceError::FdPassing { operation, source }
}

/// Removes the socket file when serving ends, however it ends.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(self.0)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::debug!(path = %self.0.display(), %error, "cannot remove the fd socket");
        }
    }
}

/// Listens on `socket_path`, accepts exactly one connection and sends it one
/// message: a single `0` byte with an SCM_RIGHTS control message carrying
/// `fds` in order (for uinput devices: [absolute, relative, keyboard], see
/// [`UinputDevices::fds`]). Returns `Ok` without sending if `cancel` fires
/// before anyone connects. The socket file is removed when this returns.
///
/// The fds are only borrowed; to run this in a task, move an
/// `Arc<UinputDevices>` into it:
///
/// ```ignore
/// tokio::spawn(async move {
///     serve_device_fds(&devices.fds(), &socket_path, &cancel).await
/// });
/// ```
pub async fn serve_device_fds<F: AsFd + Sync>(
    fds: &[F],
    socket_path: &Path,
    cancel: &CancellationToken,
) -> Result<(), ResourceError> {
    if let Some(parent) = socket_path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| fd_error("create the socket directory", source))?;
    }
    // A socket file left by an earlier run would make bind fail.
    match std::fs::remove_file(socket_path) {
        Ok(()) => tracing::debug!(path = %socket_path.display(), "removed a stale fd socket"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(fd_error("remove the stale socket", source)),
    }
    let listener = UnixListener::bind(socket_path).map_err(|source| fd_error("bind", source))?;
    let _remove = RemoveOnDrop(socket_path);

    let stream = tokio::select! {
        () = cancel.cancelled() => {
            tracing::debug!(path = %socket_path.display(), "cancelled before anyone took the device fds");
            return Ok(());
        }
        accepted = listener.accept() => accepted.map_err(|source| fd_error("accept", source))?.0,
    };
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_fd().as_raw_fd()).collect();
    send_fds(&stream, &raw).await?;
    tracing::debug!(path = %socket_path.display(), count = raw.len(), "passed device fds");
    Ok(())
}

/// Sends one `0` byte carrying `fds` as SCM_RIGHTS.
async fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> Result<(), ResourceError> {
    let data = [0u8];
    loop {
        stream
            .writable()
            .await
            .map_err(|source| fd_error("wait for the socket to be writable", source))?;
        // The message is built inside the closure so that nothing borrowed
        // from the cmsg types is held across an await.
        let sent = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&data)];
            let cmsgs = [ControlMessage::ScmRights(fds)];
            // MSG_NOSIGNAL: a peer that hung up must give EPIPE, not SIGPIPE.
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(1) => return Ok(()),
            Ok(n) => {
                return Err(fd_error(
                    "sendmsg",
                    io::Error::new(io::ErrorKind::WriteZero, format!("sent {n} bytes, not 1")),
                ));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(source) => return Err(fd_error("sendmsg", source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{IoSliceMut, Read};
    use std::mem::offset_of;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Arc;

    use nix::libc::uinput_user_dev;
    use nix::sys::socket::{ControlMessageOwned, recvmsg};

    /// A fresh directory under the system temp dir.
    fn temp_dir(purpose: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hs-{purpose}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        dir
    }

    #[test]
    fn request_codes_match_the_kernel_headers() {
        // The values <linux/uinput.h> gives on x86_64 and aarch64.
        assert_eq!(request::UI_DEV_CREATE, 0x5501);
        assert_eq!(request::UI_DEV_DESTROY, 0x5502);
        assert_eq!(request::UI_SET_EVBIT, 0x4004_5564);
        assert_eq!(request::UI_SET_KEYBIT, 0x4004_5565);
        assert_eq!(request::UI_SET_RELBIT, 0x4004_5566);
        assert_eq!(request::UI_SET_ABSBIT, 0x4004_5567);
        assert_eq!(request::UI_SET_PROPBIT, 0x4004_556e);
        let sysname_64 = nix::request_code_read!(b'U', request::UI_GET_SYSNAME_NR, 64);
        assert_eq!(sysname_64, 0x8040_552c);
    }

    #[test]
    fn user_dev_layout_matches_the_c_struct() {
        assert_eq!(USER_DEV_SIZE, 1116);
        assert_eq!(size_of::<uinput_user_dev>(), USER_DEV_SIZE);
        assert_eq!(offset_of!(uinput_user_dev, id), 80);
        assert_eq!(offset_of!(uinput_user_dev, ff_effects_max), 88);
        assert_eq!(offset_of!(uinput_user_dev, absmax), 92);
        assert_eq!(offset_of!(uinput_user_dev, absmin), 348);
        assert_eq!(offset_of!(uinput_user_dev, absfuzz), 604);
        assert_eq!(offset_of!(uinput_user_dev, absflat), 860);
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_ne_bytes([bytes[offset], bytes[offset + 1]])
    }

    fn i32_at(bytes: &[u8], offset: usize) -> i32 {
        let mut word = [0u8; 4];
        word.copy_from_slice(&bytes[offset..offset + 4]);
        i32::from_ne_bytes(word)
    }

    #[test]
    fn absolute_user_dev_bytes() {
        let bytes = DeviceSpec::absolute().user_dev().to_bytes();
        assert_eq!(bytes.len(), USER_DEV_SIZE);
        let name = b"Whist Virtual Absolute Input";
        assert_eq!(&bytes[..name.len()], name);
        assert!(bytes[name.len()..80].iter().all(|&b| b == 0));
        assert_eq!(u16_at(&bytes, 80), 0x03, "bustype");
        assert_eq!(u16_at(&bytes, 82), 0xF4C1, "vendor");
        assert_eq!(u16_at(&bytes, 84), 0x1124, "product");
        assert_eq!(u16_at(&bytes, 86), 1, "version");
        assert_eq!(i32_at(&bytes, 88), 0, "ff_effects_max");
        let absmax = offset_of!(uinput_user_dev, absmax);
        let absmin = offset_of!(uinput_user_dev, absmin);
        assert_eq!(i32_at(&bytes, absmax), 0xFFF, "absmax[ABS_X]");
        assert_eq!(i32_at(&bytes, absmax + 4), 0xFFF, "absmax[ABS_Y]");
        assert_eq!(i32_at(&bytes, absmax + 8), 0, "absmax[ABS_Z]");
        assert_eq!(i32_at(&bytes, absmin), 0, "absmin[ABS_X]");
        assert!(bytes[absmin..].iter().all(|&b| b == 0));
    }

    #[test]
    fn long_names_keep_a_terminating_nul() {
        let mut spec = DeviceSpec::keyboard();
        spec.name = "a name that is far too long for the eighty bytes the kernel gives a uinput device name";
        let bytes = spec.user_dev().to_bytes();
        assert_eq!(bytes[79], 0);
        assert_eq!(bytes[78], spec.name.as_bytes()[78]);
    }

    #[test]
    fn device_specs() {
        let absolute = DeviceSpec::absolute();
        assert_eq!(absolute.event_types(), [0, 1, 3]);
        assert_eq!(absolute.keys, [0x14a, 0x140, 0x14b]);
        assert_eq!(absolute.properties, [0]);

        let relative = DeviceSpec::relative();
        assert_eq!(relative.event_types(), [0, 1, 2]);
        assert_eq!(relative.rel_axes, [0, 1, 6, 8, 0x0b, 0x0c]);
        assert_eq!(relative.product, 0x1123);

        let keyboard = DeviceSpec::keyboard();
        assert_eq!(keyboard.event_types(), [0, 1]);
        assert_eq!(keyboard.keys.len(), 0x2ff);
        assert_eq!(keyboard.keys.last(), Some(&0x2fe));
        assert_eq!(keyboard.product, 0x1122);
    }

    #[test]
    fn finds_the_event_node_in_sysfs() {
        let dir = temp_dir("sysfs");
        for name in ["capabilities", "mouse0", "eventual", "name"] {
            std::fs::create_dir_all(dir.join(name)).expect("create an entry");
        }
        assert!(event_node_in(&dir).is_err());
        std::fs::create_dir_all(dir.join("event17")).expect("create the event entry");
        assert_eq!(
            event_node_in(&dir).expect("event17 is there"),
            Path::new("/dev/input/event17")
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn missing_uinput_is_an_error_not_a_panic() {
        let missing = temp_dir("no-uinput").join("uinput");
        assert!(!uinput_available(&missing));
        assert!(matches!(
            UinputDevices::create(&missing),
            Err(ResourceError::Uinput {
                operation: "open uinput",
                ..
            })
        ));
    }

    #[test]
    fn a_regular_file_fails_at_the_first_ioctl() {
        let dir = temp_dir("not-uinput");
        let path = dir.join("uinput");
        std::fs::write(&path, b"").expect("create a regular file");
        assert!(matches!(
            UinputDevices::create(&path),
            Err(ResourceError::Uinput {
                operation: "UI_SET_EVBIT",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    #[ignore = "needs a writable /dev/uinput and creates real input devices"]
    fn creates_real_devices() {
        let uinput = Path::new(DEFAULT_UINPUT_PATH);
        if !uinput_available(uinput) {
            eprintln!("skipping: {DEFAULT_UINPUT_PATH} is not available");
            return;
        }
        let devices = UinputDevices::create(uinput).expect("create devices");
        let nodes = devices.device_nodes();
        for node in nodes {
            assert!(node.starts_with("/dev/input"), "{}", node.display());
            assert!(node.exists(), "{}", node.display());
        }
        assert_ne!(nodes[0], nodes[1]);
        assert_ne!(nodes[1], nodes[2]);
    }

    /// Receives one message and adopts the fds it carries.
    fn receive(stream: &std::os::unix::net::UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut data = [0u8; 16];
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let mut fds = Vec::new();
        let bytes = {
            let mut iov = [IoSliceMut::new(&mut data)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .expect("recvmsg");
            for cmsg in msg.cmsgs().expect("control messages fit") {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    for fd in raw {
                        // SAFETY: SCM_RIGHTS installed `fd` in this process
                        // and nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            msg.bytes
        };
        (data[..bytes].to_vec(), fds)
    }

    /// Connects once the server has bound, retrying for a few seconds.
    fn connect(path: &Path) -> std::os::unix::net::UnixStream {
        for _ in 0..500 {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
                return stream;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("cannot connect to {}", path.display());
    }

    #[tokio::test]
    async fn passes_fds_in_order() {
        let dir = temp_dir("fds");
        let contents = ["absolute", "relative", "keyboard"];
        let files: Vec<File> = contents
            .iter()
            .map(|content| {
                let path = dir.join(content);
                std::fs::write(&path, content).expect("write a test file");
                File::open(&path).expect("open a test file")
            })
            .collect();
        let socket = dir.join("sub/dir/fds.sock");
        // Start from a stale file where the socket goes.
        std::fs::create_dir_all(socket.parent().expect("has a parent")).expect("create dirs");
        std::fs::write(&socket, b"stale").expect("write a stale file");

        let cancel = CancellationToken::new();
        let server = {
            let socket = socket.clone();
            let files = Arc::new(files);
            tokio::spawn(async move { serve_device_fds(&files, &socket, &cancel).await })
        };
        let client = {
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || receive(&connect(&socket)))
        };
        let (data, fds) = client.await.expect("client task");
        server.await.expect("server task").expect("served");

        assert_eq!(data, [0]);
        assert_eq!(fds.len(), 3);
        for (fd, expected) in fds.into_iter().zip(contents) {
            let mut text = String::new();
            File::from(fd)
                .read_to_string(&mut text)
                .expect("read through the fd");
            assert_eq!(text, expected);
        }
        assert!(!socket.exists(), "the socket file is removed after serving");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[tokio::test]
    async fn cancel_before_connect_returns_ok() {
        let dir = temp_dir("fds-cancel");
        let socket = dir.join("fds.sock");
        let file = File::open(std::env::temp_dir()).expect("open a directory");
        let cancel = CancellationToken::new();
        cancel.cancel();
        serve_device_fds(&[file], &socket, &cancel)
            .await
            .expect("cancelled is fine");
        assert!(!socket.exists());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn serving_from_uinput_devices_is_send() {
        fn assert_send<T: Send>(_: T) {}
        fn serve(devices: Arc<UinputDevices>, path: PathBuf, cancel: CancellationToken) {
            assert_send(async move { serve_device_fds(&devices.fds(), &path, &cancel).await });
        }
        let _ = serve;
    }
}
