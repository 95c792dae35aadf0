//! Host ports bound to a mandelbox's fixed container ports.
//!
//! Every mandelbox listens on the same four container ports; each gets its own
//! four host ports so that many boxes can share one host. The allocator tracks
//! what it has handed out per protocol and, before handing a port out, checks
//! that nothing else on the machine holds it right now.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::ops::Range;

use super::ResourceError;

/// A transport protocol of a port binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The protocol as Docker spells it in port specs ("tcp"/"udp").
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The container ports every mandelbox exposes, in `HostPorts` field order.
const CONTAINER_PORTS: [(u16, Protocol); 4] = [
    (32261, Protocol::Tcp),
    (32262, Protocol::Tcp),
    (32263, Protocol::Udp),
    (32273, Protocol::Tcp),
];

/// The host ports bound to one mandelbox's container ports.
///
/// The field names are part of a wire contract (they are sent to clients as
/// is), so they name the container port each host port is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HostPorts {
    /// Host port bound to container port 32261/tcp.
    pub port_32261: u16,
    /// Host port bound to container port 32262/tcp.
    pub port_32262: u16,
    /// Host port bound to container port 32263/udp.
    pub port_32263: u16,
    /// Host port bound to container port 32273/tcp.
    pub port_32273: u16,
}

/// One host port bound to one container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortBinding {
    /// The port on the host.
    pub host: u16,
    /// The port inside the container.
    pub container: u16,
    /// The protocol of both.
    pub protocol: Protocol,
}

impl HostPorts {
    /// The four bindings, in field order.
    pub fn all(&self) -> [PortBinding; 4] {
        let hosts = self.host_ports();
        std::array::from_fn(|i| PortBinding {
            host: hosts[i],
            container: CONTAINER_PORTS[i].0,
            protocol: CONTAINER_PORTS[i].1,
        })
    }

    /// The host ports in field order (the order of `CONTAINER_PORTS`).
    fn host_ports(&self) -> [u16; 4] {
        [
            self.port_32261,
            self.port_32262,
            self.port_32263,
            self.port_32273,
        ]
    }

    fn from_host_ports(ports: [u16; 4]) -> Self {
        let [port_32261, port_32262, port_32263, port_32273] = ports;
        HostPorts {
            port_32261,
            port_32262,
            port_32263,
            port_32273,
        }
    }
}

/// Checks whether a port can be bound on all interfaces right now.
type Probe = fn(u16, Protocol) -> bool;

/// Hands out host ports for mandelboxes.
///
/// A rotating cursor walks the range: it starts at a random offset (so that a
/// restarted agent does not immediately reuse the ports the previous run just
/// released) and continues after the last port handed out. An allocation scans
/// the range at most once, so exhaustion is detected deterministically.
#[derive(Debug)]
pub struct PortAllocator {
    range: Range<u16>,
    reserved: HashSet<u16>,
    tcp_in_use: HashSet<u16>,
    udp_in_use: HashSet<u16>,
    /// Offset into `range` of the next port to consider.
    cursor: u16,
    probe: Probe,
}

impl PortAllocator {
    /// The ports mandelboxes get by default: the IANA registered ports above
    /// the privileged ones, stopping where the IANA dynamic range (49152..)
    /// begins. Linux's own ephemeral range (usually 32768..61000) overlaps it;
    /// the bind probe in `allocate` is what keeps the two from colliding.
    pub const fn default_range() -> Range<u16> {
        1025..49151
    }

    /// An allocator over `range` that never hands out the `reserved` ports
    /// (e.g. the agent's own listening ports).
    pub fn new(range: Range<u16>, reserved: impl IntoIterator<Item = u16>) -> Self {
        let len = range_len(&range);
        let cursor = if len == 0 {
            0
        } else {
            let random = RandomState::new().hash_one(0u8);
            u16::try_from(random % u64::from(len)).expect("remainder of a u16 divisor fits in u16")
        };
        PortAllocator {
            range,
            reserved: reserved.into_iter().collect(),
            tcp_in_use: HashSet::new(),
            udp_in_use: HashSet::new(),
            cursor,
            probe: port_is_free,
        }
    }

    /// Allocates four host ports, all different, none reserved, none in use
    /// for its protocol, and each bindable on `0.0.0.0` right now. All or none:
    /// on error nothing is marked used.
    pub fn allocate(&mut self) -> Result<HostPorts, ResourceError> {
        let len = range_len(&self.range);
        let mut chosen: [Option<u16>; 4] = [None; 4];
        let mut last_offset = None;

        for step in 0..len {
            let offset = wrapping_offset(self.cursor, step, len);
            let port = self.range.start + offset;
            if self.reserved.contains(&port) {
                continue;
            }
            // A port fills at most one slot, so the four are distinct. A port
            // that fails the probe is only skipped: whatever holds it may let
            // go, and it was never ours to mark.
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let Some(slot) = (0..4)
                    .find(|&slot| chosen[slot].is_none() && CONTAINER_PORTS[slot].1 == protocol)
                else {
                    continue;
                };
                if self.is_in_use(port, protocol) || !(self.probe)(port, protocol) {
                    continue;
                }
                chosen[slot] = Some(port);
                last_offset = Some(offset);
                break;
            }
            if chosen.iter().all(Option::is_some) {
                break;
            }
        }

        let (Some(a), Some(b), Some(c), Some(d)) = (chosen[0], chosen[1], chosen[2], chosen[3])
        else {
            return Err(ResourceError::PortsExhausted {
                start: self.range.start,
                end: self.range.end,
            });
        };
        let ports = HostPorts::from_host_ports([a, b, c, d]);
        self.mark_used(&ports);
        if let Some(offset) = last_offset {
            self.cursor = wrapping_offset(offset, 1, len);
        }
        Ok(ports)
    }

    /// Marks ports as used without probing, for adopting a container that
    /// already holds them (e.g. after the agent restarted). Fails, claiming
    /// none, if any is reserved or already in use for its protocol.
    pub fn claim(&mut self, ports: HostPorts) -> Result<(), ResourceError> {
        let mut seen = HashSet::new();
        for binding in ports.all() {
            let PortBinding { host, protocol, .. } = binding;
            if self.reserved.contains(&host)
                || self.is_in_use(host, protocol)
                || !seen.insert((host, protocol))
            {
                return Err(ResourceError::PortInUse {
                    port: host,
                    protocol,
                });
            }
        }
        self.mark_used(&ports);
        Ok(())
    }

    /// Gives ports back. Releasing a port that is not in use is logged, not
    /// fatal: it means the caller's bookkeeping slipped, not that the host is
    /// in danger.
    pub fn release(&mut self, ports: HostPorts) {
        for PortBinding { host, protocol, .. } in ports.all() {
            if !self.in_use_set(protocol).remove(&host) {
                tracing::warn!(port = host, %protocol, "released a host port that was not in use");
            }
        }
    }

    /// How many (port, protocol) pairs are in use; four per mandelbox.
    pub fn in_use(&self) -> usize {
        self.tcp_in_use.len() + self.udp_in_use.len()
    }

    fn is_in_use(&self, port: u16, protocol: Protocol) -> bool {
        match protocol {
            Protocol::Tcp => self.tcp_in_use.contains(&port),
            Protocol::Udp => self.udp_in_use.contains(&port),
        }
    }

    fn in_use_set(&mut self, protocol: Protocol) -> &mut HashSet<u16> {
        match protocol {
            Protocol::Tcp => &mut self.tcp_in_use,
            Protocol::Udp => &mut self.udp_in_use,
        }
    }

    fn mark_used(&mut self, ports: &HostPorts) {
        for PortBinding { host, protocol, .. } in ports.all() {
            self.in_use_set(protocol).insert(host);
        }
    }

    /// Replaces the machine probe, so that tests do not depend on what else
    /// runs on the machine.
    #[cfg(test)]
    fn with_probe(mut self, probe: Probe) -> Self {
        self.probe = probe;
        self
    }

    /// Starts the scan at the first port of the range instead of a random one.
    #[cfg(test)]
    fn scanning_from_start(mut self) -> Self {
        self.cursor = 0;
        self
    }
}

fn range_len(range: &Range<u16>) -> u16 {
    range.end.saturating_sub(range.start)
}

/// `(offset + step) % len` without overflowing u16.
fn wrapping_offset(offset: u16, step: u16, len: u16) -> u16 {
    let sum = (u32::from(offset) + u32::from(step)) % u32::from(len);
    u16::try_from(sum).expect("remainder of a u16 divisor fits in u16")
}

/// Whether `port` can be bound on all interfaces for `protocol` right now.
/// Docker's proxy binds `0.0.0.0`, so that is the address that must be free.
fn port_is_free(port: u16, protocol: Protocol) -> bool {
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    match protocol {
        Protocol::Tcp => TcpListener::bind(addr).is_ok(),
        Protocol::Udp => UdpSocket::bind(addr).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn always_free(_: u16, _: Protocol) -> bool {
        true
    }

    fn ports_of(ports: &HostPorts) -> HashSet<u16> {
        ports.host_ports().into_iter().collect()
    }

    #[test]
    fn allocates_four_distinct_ports_in_range() {
        let range = PortAllocator::default_range();
        let mut allocator = PortAllocator::new(range.clone(), []);
        let ports = allocator
            .allocate()
            .expect("the default range has free ports");
        let set = ports_of(&ports);
        assert_eq!(set.len(), 4, "{ports:?}");
        assert!(set.iter().all(|p| range.contains(p)), "{ports:?}");
        assert_eq!(allocator.in_use(), 4);
    }

    #[test]
    fn bindings_follow_the_container_ports() {
        let ports = HostPorts::from_host_ports([1, 2, 3, 4]);
        let all = ports.all();
        assert_eq!(
            all.map(|b| (b.host, b.container, b.protocol.as_str())),
            [
                (1, 32261, "tcp"),
                (2, 32262, "tcp"),
                (3, 32263, "udp"),
                (4, 32273, "tcp"),
            ]
        );
    }

    #[test]
    fn wire_field_names_are_stable() {
        let ports = HostPorts::from_host_ports([1, 2, 3, 4]);
        let json = serde_json::to_value(ports).expect("HostPorts serializes");
        assert_eq!(
            json,
            serde_json::json!({"port_32261": 1, "port_32262": 2, "port_32263": 3, "port_32273": 4})
        );
    }

    #[test]
    fn never_hands_out_reserved_ports() {
        let mut allocator = PortAllocator::new(2000..2010, 2000..2006).with_probe(always_free);
        let ports = allocator.allocate().expect("four unreserved ports remain");
        assert_eq!(ports_of(&ports), (2006..2010).collect());
        assert!(matches!(
            allocator.allocate(),
            Err(ResourceError::PortsExhausted {
                start: 2000,
                end: 2010
            })
        ));
    }

    /// Allocates from a range starting at `held`, scanning from its start.
    fn allocate_from(held: u16) -> HostPorts {
        let end = held.saturating_add(64);
        let mut allocator = PortAllocator::new(held..end, []).scanning_from_start();
        allocator
            .allocate()
            .expect("some of the 64 ports after the held one are free")
    }

    #[test]
    fn skips_a_port_held_by_a_real_tcp_listener() {
        let listener =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind an ephemeral port");
        let held = listener.local_addr().expect("listener address").port();
        let ports = allocate_from(held);
        // The port is still free for UDP, so only the TCP bindings must avoid it.
        for binding in ports.all() {
            if binding.protocol == Protocol::Tcp {
                assert_ne!(binding.host, held, "{ports:?}");
            }
        }
    }

    #[test]
    fn skips_a_port_held_by_a_real_udp_socket() {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind an ephemeral port");
        let held = socket.local_addr().expect("socket address").port();
        let ports = allocate_from(held);
        assert_ne!(ports.port_32263, held, "{ports:?}");
    }

    #[test]
    fn a_port_failing_the_probe_is_skipped_not_marked() {
        static BUSY: AtomicBool = AtomicBool::new(true);
        fn first_port_busy(port: u16, _: Protocol) -> bool {
            port != 3000 || !BUSY.load(Ordering::SeqCst)
        }
        let mut allocator = PortAllocator::new(3000..3005, [])
            .with_probe(first_port_busy)
            .scanning_from_start();
        let first = allocator
            .allocate()
            .expect("four ports besides the busy one");
        assert_eq!(ports_of(&first), (3001..3005).collect());

        BUSY.store(false, Ordering::SeqCst);
        allocator.release(first);
        let mut allocator = allocator.scanning_from_start();
        let second = allocator.allocate().expect("all five are free now");
        assert!(ports_of(&second).contains(&3000), "{second:?}");
    }

    #[test]
    fn udp_in_use_only_blocks_udp() {
        fn udp_busy(port: u16, protocol: Protocol) -> bool {
            !(port == 4000 && protocol == Protocol::Udp)
        }
        let mut allocator = PortAllocator::new(4000..4004, [])
            .with_probe(udp_busy)
            .scanning_from_start();
        let ports = allocator.allocate().expect("4000 is still free for TCP");
        assert_eq!(ports_of(&ports), (4000..4004).collect());
        assert_ne!(ports.port_32263, 4000);
    }

    #[test]
    fn exhaustion_leaves_nothing_allocated() {
        let mut tiny = PortAllocator::new(5000..5003, []).with_probe(always_free);
        assert!(matches!(
            tiny.allocate(),
            Err(ResourceError::PortsExhausted { .. })
        ));
        assert_eq!(tiny.in_use(), 0);

        let mut empty = PortAllocator::new(5000..5000, []).with_probe(always_free);
        assert!(empty.allocate().is_err());

        let mut five = PortAllocator::new(5000..5005, []).with_probe(always_free);
        five.allocate().expect("five ports hold one mandelbox");
        assert!(five.allocate().is_err());
        assert_eq!(five.in_use(), 4);
    }

    #[test]
    fn cursor_moves_on_after_each_allocation() {
        let mut allocator = PortAllocator::new(6000..6012, [])
            .with_probe(always_free)
            .scanning_from_start();
        let first = allocator.allocate().expect("first");
        allocator.release(first);
        let second = allocator.allocate().expect("second");
        assert_eq!(ports_of(&first), (6000..6004).collect());
        assert_eq!(ports_of(&second), (6004..6008).collect());
    }

    #[test]
    fn release_makes_ports_available_again() {
        let mut allocator = PortAllocator::new(7000..7004, []).with_probe(always_free);
        let ports = allocator.allocate().expect("exactly four ports");
        assert!(allocator.allocate().is_err());
        allocator.release(ports);
        assert_eq!(allocator.in_use(), 0);
        let again = allocator.allocate().expect("released ports are free again");
        assert_eq!(ports_of(&again), ports_of(&ports));
        // Releasing twice only warns.
        allocator.release(again);
        allocator.release(again);
        assert_eq!(allocator.in_use(), 0);
    }

    #[test]
    fn claim_marks_ports_and_detects_conflicts() {
        let mut allocator = PortAllocator::new(8000..8008, [8007]).with_probe(always_free);
        let held = HostPorts::from_host_ports([8000, 8001, 8002, 8003]);
        allocator.claim(held).expect("nothing is in use yet");
        assert_eq!(allocator.in_use(), 4);

        // Overlapping on one TCP port: nothing of the second set is claimed.
        let overlapping = HostPorts::from_host_ports([8004, 8005, 8006, 8001]);
        assert!(matches!(
            allocator.claim(overlapping),
            Err(ResourceError::PortInUse {
                port: 8001,
                protocol: Protocol::Tcp
            })
        ));
        assert_eq!(allocator.in_use(), 4);

        // Reserved ports cannot be claimed either.
        let reserved = HostPorts::from_host_ports([8004, 8005, 8006, 8007]);
        assert!(matches!(
            allocator.claim(reserved),
            Err(ResourceError::PortInUse { port: 8007, .. })
        ));

        // The same number twice for TCP conflicts with itself.
        let doubled = HostPorts::from_host_ports([8004, 8004, 8005, 8006]);
        assert!(allocator.claim(doubled).is_err());
        assert_eq!(allocator.in_use(), 4);

        // Claimed ports are not handed out again for the same protocol.
        let claimed: HashSet<(u16, Protocol)> =
            held.all().iter().map(|b| (b.host, b.protocol)).collect();
        let ports = allocator.allocate().expect("enough unclaimed ports");
        for binding in ports.all() {
            assert!(
                !claimed.contains(&(binding.host, binding.protocol)),
                "{binding:?} was claimed"
            );
        }
    }
}
