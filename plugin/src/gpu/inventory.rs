//! GPU discovery: what NVML says about each GPU on the node, read once at start.
//!
//! A GPU that NVML cannot read is reported and left out; the agent refuses to start only when no GPU is left.
//! The list is sorted by minor number, the order the scheduler uses as the device index (docs/volcano-contract.md §2.1).

use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

/// One physical GPU as the agent advertises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// NVML's index, needed to find the device again (events, probes).
    pub nvml_index: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// NVML's product name, e.g. `NVIDIA A100-SXM4-80GB`.
    pub model: String,
    /// Total framebuffer memory in bytes.
    pub memory_bytes: u64,
    /// `/dev/nvidia<minor>`.
    pub minor: u32,
    /// The NUMA node the GPU is attached to, when NVML or sysfs knows it.
    pub numa_node: Option<u32>,
    /// PCI bus id as NVML prints it (`00000000:07:00.0`).
    pub pci_bus_id: String,
}

impl Gpu {
    /// Total memory in whole MiB, as the contract counts it.
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes >> 20
    }
}

/// The node's usable GPUs, sorted by minor number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Sorted by `minor`.
    pub gpus: Vec<Gpu>,
}

/// Why discovery found nothing to serve.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `nvmlDeviceGetCount` itself failed.
    #[error("NVML could not count the GPUs")]
    Count(#[source] NvmlError),
    /// NVML sees no GPU at all.
    #[error("NVML reports no GPU on this node; nothing to serve")]
    NoGpus,
    /// Every GPU failed to answer; the first failure is attached.
    #[error("none of the {count} GPUs NVML reports could be read (first: GPU {index}: {what})")]
    NoneReadable {
        /// How many GPUs NVML counted.
        count: u32,
        /// NVML index of the first failure.
        index: u32,
        /// What failed on it.
        what: String,
    },
}

/// Reads every GPU NVML reports. `sysfs_root` is `/sys` on a real node.
pub fn discover(nvml: &Nvml, sysfs_root: &Path) -> Result<Inventory, DiscoveryError> {
    let count = nvml.device_count().map_err(DiscoveryError::Count)?;
    if count == 0 {
        return Err(DiscoveryError::NoGpus);
    }
    let mut gpus = Vec::with_capacity(count as usize);
    let mut first_failure = None;
    for index in 0..count {
        match read_gpu(nvml, index, sysfs_root) {
            Ok(gpu) => gpus.push(gpu),
            Err(what) => {
                tracing::error!(index, error = %what, "GPU cannot be read through NVML; it will not be advertised");
                first_failure.get_or_insert((index, what));
            }
        }
    }
    if gpus.is_empty() {
        let (index, what) = first_failure.unwrap_or((0, "unknown".to_owned()));
        return Err(DiscoveryError::NoneReadable { count, index, what });
    }
    gpus.sort_by(|a, b| a.minor.cmp(&b.minor).then_with(|| a.uuid.cmp(&b.uuid)));
    Ok(Inventory { gpus })
}

fn read_gpu(nvml: &Nvml, index: u32, sysfs_root: &Path) -> Result<Gpu, String> {
    let ctx = |what: &'static str| move |e: NvmlError| format!("{what}: {e}");
    let device = nvml
        .device_by_index(index)
        .map_err(ctx("nvmlDeviceGetHandleByIndex"))?;
    let uuid = device.uuid().map_err(ctx("nvmlDeviceGetUUID"))?;
    let model = device.name().map_err(ctx("nvmlDeviceGetName"))?;
    let memory_bytes = device
        .memory_info()
        .map_err(ctx("nvmlDeviceGetMemoryInfo_v2"))?
        .total;
    let minor = device
        .minor_number()
        .map_err(ctx("nvmlDeviceGetMinorNumber"))?;
    let pci_bus_id = device
        .pci_info()
        .map_err(ctx("nvmlDeviceGetPciInfo_v3"))?
        .bus_id;
    // nvmlDeviceGetNumaNodeId exists only in recent drivers; older ones (and GPUs it does not cover) answer
    // NotSupported or lack the symbol, and the kernel's view of the PCI device is the fallback.
    let numa_node = match device.numa_node_id() {
        Ok(node) => Some(node),
        Err(_) => numa_node_from_sysfs(sysfs_root, &pci_bus_id),
    };
    Ok(Gpu {
        nvml_index: index,
        uuid,
        model,
        memory_bytes,
        minor,
        numa_node,
        pci_bus_id,
    })
}

/// `/sys/bus/pci/devices/<domain:bus:dev.fn>/numa_node`, where -1 means "no NUMA affinity".
fn numa_node_from_sysfs(sysfs_root: &Path, nvml_bus_id: &str) -> Option<u32> {
    let path = sysfs_root
        .join("bus/pci/devices")
        .join(sysfs_pci_address(nvml_bus_id))
        .join("numa_node");
    let text = std::fs::read_to_string(path).ok()?;
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// NVML prints an 8-digit PCI domain in upper case; sysfs names devices with a 4-digit domain in lower case.
fn sysfs_pci_address(nvml_bus_id: &str) -> String {
    let lower = nvml_bus_id.trim().to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) if domain.len() == 8 && domain.starts_with("0000") => {
            format!("{}:{rest}", &domain[4..])
        }
        _ => lower,
    }
}

/// Removes the GPUs `filterdevices` names (by UUID or NVML index), logging each.
pub fn apply_filter(inventory: &mut Inventory, filter: &crate::config::device::FilterDevices) {
    inventory.gpus.retain(|g| {
        let hidden = filter.uuid.iter().any(|u| u.eq_ignore_ascii_case(&g.uuid))
            || filter.index.contains(&g.nvml_index);
        if hidden {
            tracing::info!(uuid = %g.uuid, index = g.nvml_index, "GPU hidden by filterdevices");
        }
        !hidden
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_address_is_shortened_to_the_sysfs_form() {
        assert_eq!(sysfs_pci_address("00000000:07:00.0"), "0000:07:00.0");
        assert_eq!(sysfs_pci_address("00000000:AF:00.0"), "0000:af:00.0");
        assert_eq!(sysfs_pci_address("0001:3B:00.0"), "0001:3b:00.0");
    }

    #[test]
    fn numa_node_is_read_from_sysfs_and_minus_one_means_none() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("bus/pci/devices/0000:af:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("numa_node"), "1\n").unwrap();
        assert_eq!(
            numa_node_from_sysfs(root.path(), "00000000:AF:00.0"),
            Some(1)
        );
        std::fs::write(dev.join("numa_node"), "-1\n").unwrap();
        assert_eq!(numa_node_from_sysfs(root.path(), "00000000:AF:00.0"), None);
        assert_eq!(numa_node_from_sysfs(root.path(), "00000000:07:00.0"), None);
    }
}
