//! How many mandelboxes an instance type holds.
//!
//! A mandelbox needs a share of a GPU (at most three per GPU) and four vCPUs; a type's capacity is
//! whichever of the two runs out first. Types missing from the table hold nothing, so the fleet
//! never launches a type it cannot account for.

/// Mandelboxes that share one GPU at most.
pub const MANDELBOXES_PER_GPU: u32 = 3;
/// vCPUs reserved for one mandelbox.
pub const VCPUS_PER_MANDELBOX: u32 = 4;

/// The hardware of one instance type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceTypeSpec {
    pub name: &'static str,
    pub gpus: u32,
    pub vcpus: u32,
}

impl InstanceTypeSpec {
    pub const fn capacity(&self) -> u32 {
        let by_gpu = self.gpus * MANDELBOXES_PER_GPU;
        let by_cpu = self.vcpus / VCPUS_PER_MANDELBOX;
        if by_gpu < by_cpu { by_gpu } else { by_cpu }
    }
}

/// Instance types the fleet knows how to run.
pub const INSTANCE_TYPES: &[InstanceTypeSpec] = &[
    InstanceTypeSpec {
        name: "g4dn.xlarge",
        gpus: 1,
        vcpus: 4,
    },
    InstanceTypeSpec {
        name: "g4dn.2xlarge",
        gpus: 1,
        vcpus: 8,
    },
    InstanceTypeSpec {
        name: "g4dn.4xlarge",
        gpus: 1,
        vcpus: 16,
    },
    InstanceTypeSpec {
        name: "g4dn.8xlarge",
        gpus: 1,
        vcpus: 32,
    },
    InstanceTypeSpec {
        name: "g4dn.12xlarge",
        gpus: 4,
        vcpus: 48,
    },
    InstanceTypeSpec {
        name: "g4dn.16xlarge",
        gpus: 1,
        vcpus: 64,
    },
    InstanceTypeSpec {
        name: "g5.xlarge",
        gpus: 1,
        vcpus: 4,
    },
    InstanceTypeSpec {
        name: "g5.2xlarge",
        gpus: 1,
        vcpus: 8,
    },
    InstanceTypeSpec {
        name: "g5.4xlarge",
        gpus: 1,
        vcpus: 16,
    },
    InstanceTypeSpec {
        name: "g5.12xlarge",
        gpus: 4,
        vcpus: 48,
    },
];

/// The spec of a known instance type.
pub fn instance_type_spec(name: &str) -> Option<&'static InstanceTypeSpec> {
    INSTANCE_TYPES.iter().find(|spec| spec.name == name)
}

/// Mandelboxes an instance of this type holds; 0 for unknown types.
pub fn capacity_of(instance_type: &str) -> u32 {
    instance_type_spec(instance_type).map_or(0, InstanceTypeSpec::capacity)
}

/// The one rule for "a host is idle": no user holds any of its `capacity` sessions, i.e. its
/// remaining capacity is all of it. The scaler's view, its idle tracking and the conditional
/// drain (`ops::drain_idle_instance`, given the same capacity) all follow it.
pub fn is_idle(remaining: i32, capacity: u32) -> bool {
    i64::from(remaining) >= i64::from(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_means_every_session_free() {
        assert!(is_idle(3, 3));
        assert!(!is_idle(2, 3));
        assert!(!is_idle(-1, 0), "a negative count is never idle");
        assert!(is_idle(0, 0));
    }

    #[test]
    fn capacity_is_the_scarcer_of_gpu_and_cpu() {
        let expected = [
            ("g4dn.xlarge", 1),
            ("g4dn.2xlarge", 2),
            ("g4dn.4xlarge", 3),
            ("g4dn.8xlarge", 3),
            ("g4dn.12xlarge", 12),
            ("g4dn.16xlarge", 3),
        ];
        for (name, capacity) in expected {
            assert_eq!(capacity_of(name), capacity, "{name}");
        }
    }

    #[test]
    fn unknown_types_hold_nothing() {
        assert_eq!(capacity_of("t3.micro"), 0);
    }
}
