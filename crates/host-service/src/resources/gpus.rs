//! The host's GPUs and how many mandelboxes each one runs.
//!
//! Discovery goes through NVML. A host without NVIDIA drivers is normal (dev
//! machines, CI): it gets an empty inventory and its boxes run without a GPU.
//! GPU indices are NVML indices, which are also what `NVIDIA_VISIBLE_DEVICES`
//! means to the NVIDIA container runtime.

use std::fmt;
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use super::ResourceError;

/// How many mandelboxes share one GPU by default.
pub const MANDELBOXES_PER_GPU: u32 = 3;

/// A GPU as discovered at startup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuInfo {
    /// NVML index of the device.
    pub index: u32,
    /// Product name, e.g. "NVIDIA A10G".
    pub name: String,
    /// NVML UUID, e.g. "GPU-…".
    pub uuid: String,
    /// Installed framebuffer memory.
    pub memory_total_bytes: u64,
}

/// A GPU's current load, for metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuUsage {
    /// NVML index of the device.
    pub index: u32,
    /// Allocated framebuffer memory.
    pub memory_used_bytes: u64,
    /// Percent of the last sample period a kernel was running.
    pub utilization_percent: u32,
}

/// The GPUs of this host.
pub trait GpuInventory: Send + Sync + fmt::Debug {
    /// The GPUs found at startup, by ascending index.
    fn gpus(&self) -> &[GpuInfo];
    /// Current load of each GPU; a GPU whose load cannot be read is left out.
    fn usage(&self) -> Vec<GpuUsage>;
}

/// GPUs discovered through NVML.
#[derive(Debug)]
pub struct NvmlGpus {
    /// Kept for `usage`; dropping it shuts NVML down.
    nvml: Nvml,
    gpus: Vec<GpuInfo>,
}

impl NvmlGpus {
    /// Initializes NVML and lists the devices. `None` when NVML cannot be
    /// loaded or initialized, which is the normal case without NVIDIA drivers.
    /// A device NVML cannot describe is left out (with a warning) rather than
    /// handed to a mandelbox.
    pub fn discover() -> Option<NvmlGpus> {
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(error) => {
                tracing::info!(%error, "NVML is not available; running without GPUs");
                return None;
            }
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => {
                tracing::warn!(%error, "NVML cannot count devices; running without GPUs");
                return None;
            }
        };
        let mut gpus = Vec::new();
        for index in 0..count {
            match describe(&nvml, index) {
                Ok(info) => gpus.push(info),
                Err(error) => {
                    tracing::warn!(index, %error, "leaving out a GPU NVML cannot describe")
                }
            }
        }
        tracing::info!(count = gpus.len(), "discovered GPUs through NVML");
        Some(NvmlGpus { nvml, gpus })
    }
}

fn describe(nvml: &Nvml, index: u32) -> Result<GpuInfo, NvmlError> {
    let device = nvml.device_by_index(index)?;
    Ok(GpuInfo {
        index,
        name: device.name()?,
        uuid: device.uuid()?,
        memory_total_bytes: device.memory_info()?.total,
    })
}

fn usage_of(nvml: &Nvml, index: u32) -> Result<GpuUsage, NvmlError> {
    let device = nvml.device_by_index(index)?;
    Ok(GpuUsage {
        index,
        memory_used_bytes: device.memory_info()?.used,
        utilization_percent: device.utilization_rates()?.gpu,
    })
}

impl GpuInventory for NvmlGpus {
    fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    fn usage(&self) -> Vec<GpuUsage> {
        self.gpus
            .iter()
            .filter_map(|gpu| match usage_of(&self.nvml, gpu.index) {
                Ok(usage) => Some(usage),
                Err(error) => {
                    tracing::debug!(index = gpu.index, %error, "cannot read GPU usage");
                    None
                }
            })
            .collect()
    }
}

/// A host without GPUs: NVML is absent or GPUs are disabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpus;

impl GpuInventory for NoGpus {
    fn gpus(&self) -> &[GpuInfo] {
        &[]
    }

    fn usage(&self) -> Vec<GpuUsage> {
        Vec::new()
    }
}

/// Made-up GPUs, for testing callers on machines without any.
#[derive(Debug, Clone)]
pub struct FakeGpus(pub Vec<GpuInfo>);

impl FakeGpus {
    /// `count` identical 16 GiB GPUs with indices 0..count.
    pub fn new(count: u32) -> Self {
        FakeGpus(
            (0..count)
                .map(|index| GpuInfo {
                    index,
                    name: "Fake GPU".to_owned(),
                    uuid: format!("GPU-00000000-0000-0000-0000-{index:012}"),
                    memory_total_bytes: 16 << 30,
                })
                .collect(),
        )
    }
}

impl GpuInventory for FakeGpus {
    fn gpus(&self) -> &[GpuInfo] {
        &self.0
    }

    fn usage(&self) -> Vec<GpuUsage> {
        self.0
            .iter()
            .map(|gpu| GpuUsage {
                index: gpu.index,
                memory_used_bytes: 0,
                utilization_percent: 0,
            })
            .collect()
    }
}

/// The host's GPUs: NVML's when `enabled` and available, none otherwise.
pub fn discover_gpus(enabled: bool) -> Arc<dyn GpuInventory> {
    if !enabled {
        tracing::info!("GPUs are disabled; mandelboxes run without one");
        return Arc::new(NoGpus);
    }
    match NvmlGpus::discover() {
        Some(gpus) => Arc::new(gpus),
        None => Arc::new(NoGpus),
    }
}

/// How many mandelboxes each GPU runs, and which GPU the next one gets.
#[derive(Debug)]
pub struct GpuSlots {
    /// (NVML index, mandelboxes on it), by ascending index.
    loads: Vec<(u32, u32)>,
    per_gpu_limit: u32,
}

impl GpuSlots {
    /// Slots for GPUs 0..gpu_count, each running at most `per_gpu_limit` boxes.
    pub fn new(gpu_count: u32, per_gpu_limit: u32) -> Self {
        GpuSlots {
            loads: (0..gpu_count).map(|index| (index, 0)).collect(),
            per_gpu_limit,
        }
    }

    /// Slots for the GPUs of an inventory, keyed by their NVML indices (which
    /// need not be contiguous when a device was left out at discovery).
    pub fn for_gpus(gpus: &[GpuInfo], per_gpu_limit: u32) -> Self {
        let mut loads: Vec<(u32, u32)> = gpus.iter().map(|gpu| (gpu.index, 0)).collect();
        loads.sort_unstable();
        loads.dedup();
        GpuSlots {
            loads,
            per_gpu_limit,
        }
    }

    /// Picks a GPU for a new mandelbox: the least loaded one with room, the
    /// lowest index among equals. `Ok(None)` when the host has no GPUs at all
    /// (boxes run without one); `NoFreeGpu` when every GPU is full.
    pub fn allocate(&mut self) -> Result<Option<u32>, ResourceError> {
        if self.loads.is_empty() {
            return Ok(None);
        }
        let limit = self.per_gpu_limit;
        let (index, load) = self
            .loads
            .iter_mut()
            .filter(|(_, load)| *load < limit)
            // `loads` is sorted by index and `min_by_key` keeps the first
            // minimum, so ties go to the lowest index.
            .min_by_key(|(_, load)| *load)
            .ok_or(ResourceError::NoFreeGpu)?;
        *load += 1;
        Ok(Some(*index))
    }

    /// Counts a mandelbox on a GPU, for adopting a container that already
    /// runs there. Fails when the GPU is unknown or full.
    pub fn claim(&mut self, index: u32) -> Result<(), ResourceError> {
        let limit = self.per_gpu_limit;
        let load = self
            .load_mut(index)
            .ok_or(ResourceError::GpuSlotUnknown(index))?;
        if *load >= limit {
            return Err(ResourceError::GpuFull(index));
        }
        *load += 1;
        Ok(())
    }

    /// Gives a slot back. Releasing a slot that is not in use, or of an
    /// unknown GPU, is logged, not fatal.
    pub fn release(&mut self, index: u32) {
        match self.load_mut(index) {
            Some(load) if *load > 0 => *load -= 1,
            Some(_) => tracing::warn!(index, "released a GPU slot that was not in use"),
            None => tracing::warn!(index, "released a slot of an unknown GPU"),
        }
    }

    /// All slots of the host; `None` means unlimited because there are no GPUs.
    pub fn total_slots(&self) -> Option<u32> {
        if self.loads.is_empty() {
            return None;
        }
        Some(self.per_gpu_limit.saturating_mul(gpu_count(&self.loads)))
    }

    /// Slots still free; `None` means unlimited because there are no GPUs.
    pub fn free_slots(&self) -> Option<u32> {
        if self.loads.is_empty() {
            return None;
        }
        Some(
            self.loads
                .iter()
                .map(|(_, load)| self.per_gpu_limit.saturating_sub(*load))
                .sum(),
        )
    }

    fn load_mut(&mut self, index: u32) -> Option<&mut u32> {
        self.loads
            .iter_mut()
            .find(|(i, _)| *i == index)
            .map(|(_, load)| load)
    }
}

fn gpu_count(loads: &[(u32, u32)]) -> u32 {
    u32::try_from(loads.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_over_gpus_lowest_index_first() {
        let mut slots = GpuSlots::new(3, 2);
        let picks: Vec<Option<u32>> = (0..6).map(|_| slots.allocate().expect("room")).collect();
        assert_eq!(
            picks,
            [Some(0), Some(1), Some(2), Some(0), Some(1), Some(2)]
        );
    }

    #[test]
    fn respects_the_limit() {
        let mut slots = GpuSlots::new(2, MANDELBOXES_PER_GPU);
        assert_eq!(slots.total_slots(), Some(6));
        for _ in 0..6 {
            slots.allocate().expect("room");
        }
        assert_eq!(slots.free_slots(), Some(0));
        assert!(matches!(slots.allocate(), Err(ResourceError::NoFreeGpu)));
    }

    #[test]
    fn release_frees_the_least_loaded_gpu() {
        let mut slots = GpuSlots::new(2, 3);
        for _ in 0..4 {
            slots.allocate().expect("room");
        }
        // GPU 0 and 1 both run 2; freeing one on GPU 1 makes it the least loaded.
        slots.release(1);
        assert_eq!(slots.free_slots(), Some(3));
        assert_eq!(slots.allocate().expect("room"), Some(1));
        // Over-releasing and unknown GPUs only warn.
        slots.release(7);
        let mut fresh = GpuSlots::new(1, 3);
        fresh.release(0);
        assert_eq!(fresh.free_slots(), Some(3));
    }

    #[test]
    fn no_gpus_means_no_gpu_and_no_limit() {
        let mut slots = GpuSlots::new(0, MANDELBOXES_PER_GPU);
        for _ in 0..10 {
            assert_eq!(slots.allocate().expect("unlimited"), None);
        }
        assert_eq!(slots.total_slots(), None);
        assert_eq!(slots.free_slots(), None);
        assert!(matches!(
            slots.claim(0),
            Err(ResourceError::GpuSlotUnknown(0))
        ));
    }

    #[test]
    fn claim_counts_and_conflicts() {
        let mut slots = GpuSlots::new(2, 2);
        slots.claim(0).expect("room");
        slots.claim(0).expect("room");
        assert!(matches!(slots.claim(0), Err(ResourceError::GpuFull(0))));
        assert!(matches!(
            slots.claim(2),
            Err(ResourceError::GpuSlotUnknown(2))
        ));
        assert_eq!(slots.allocate().expect("room"), Some(1));
        assert_eq!(slots.free_slots(), Some(1));
    }

    #[test]
    fn slots_follow_inventory_indices() {
        let mut gpus = FakeGpus::new(3);
        gpus.0.remove(1);
        let mut slots = GpuSlots::for_gpus(gpus.gpus(), 1);
        assert_eq!(slots.total_slots(), Some(2));
        assert_eq!(slots.allocate().expect("room"), Some(0));
        assert_eq!(slots.allocate().expect("room"), Some(2));
        assert!(slots.allocate().is_err());
    }

    #[test]
    fn fake_and_absent_inventories() {
        let fake = FakeGpus::new(4);
        assert_eq!(fake.gpus().len(), 4);
        assert_eq!(fake.usage().len(), 4);
        assert_eq!(
            fake.gpus().iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let disabled = discover_gpus(false);
        assert!(disabled.gpus().is_empty());
        assert!(disabled.usage().is_empty());
    }

    #[test]
    fn nvml_discovery_never_panics() {
        // Without NVIDIA drivers this is `None`; with them, a consistent list.
        if let Some(gpus) = NvmlGpus::discover() {
            for (position, gpu) in gpus.gpus().iter().enumerate() {
                assert!(gpu.index as usize >= position);
                assert!(!gpu.uuid.is_empty());
            }
            assert!(gpus.usage().len() <= gpus.gpus().len());
        }
        let _ = discover_gpus(true);
    }
}
