//! GPU and compute instance profiles, their names, and placements.

use std::fmt;

/// A GPU instance profile as NVML reports it (`nvmlGpuInstanceProfileInfo_v2_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiProfile {
    /// The profile *index* (`NVML_GPU_INSTANCE_PROFILE_1_SLICE` = 0 … ) passed to the profile-info call.
    pub index: u32,
    /// The profile *id* (`info.id`, e.g. 19 for 1g.10gb on an A100 80GB) every other call takes.
    pub id: u32,
    /// The name, without NVML's `"MIG "` prefix: `"1g.10gb"`, `"1g.10gb+me"`, `"7g.80gb"`.
    pub name: String,
    /// Where the name came from.
    pub name_source: NameSource,
    /// Compute slices (`sliceCount`).
    pub slices: u32,
    /// How many instances of this profile the GPU can hold (`instanceCount`).
    pub instance_count: u32,
    /// Streaming multiprocessors (`multiprocessorCount`).
    pub multiprocessors: u32,
    /// Memory in MiB (`memorySizeMB`).
    pub memory_mib: u64,
}

/// Where a [`GiProfile`]'s name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameSource {
    /// The `name` field of `nvmlGpuInstanceProfileInfo_v2_t` (`nvmlDeviceGetGpuInstanceProfileInfoV`).
    Nvml,
    /// Derived by [`derive_gi_name`] from slices, memory and profile index, because the driver only has the
    /// v1 call (`nvmlDeviceGetGpuInstanceProfileInfo`, whose struct has no name).
    Derived,
}

/// A compute instance profile of a GPU instance (`nvmlComputeInstanceProfileInfo_v2_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiProfile {
    /// The profile index (`NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE` = 0 …).
    pub index: u32,
    /// The profile id (`info.id`) the create call takes.
    pub id: u32,
    /// NVML's name without the `"MIG "` prefix (`"1c.3g.40gb"`, or `"3g.40gb"` for the full one), empty
    /// with the v1 call.
    pub name: String,
    /// Compute slices.
    pub slices: u32,
    /// How many of this profile the GPU instance can hold.
    pub instance_count: u32,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
}

/// A GPU instance placement: memory slices `[start, start + size)` (`nvmlGpuInstancePlacement_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placement {
    /// first memory slice
    pub start: u32,
    /// number of memory slices
    pub size: u32,
}

impl Placement {
    /// One past the last slice.
    pub fn end(self) -> u32 {
        self.start.saturating_add(self.size)
    }

    /// True if the two placements share a slice.
    pub fn overlaps(self, other: Placement) -> bool {
        self.start < other.end() && other.start < self.end()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.size)
    }
}

/// NVML's profile names read `"MIG 1g.10gb"` (as `nvidia-smi mig -lgip` prints them); layouts, Volcano's
/// `knownMigGeometries` and nvidia-mig-parted say `"1g.10gb"`. Strips the prefix and surrounding spaces.
pub fn normalize_name(name: &str) -> &str {
    let name = name.trim();
    name.strip_prefix("MIG ").map(str::trim).unwrap_or(name)
}

/// The name of a GPU instance profile from the v1 struct, which has none: `<slices>g.<GB>gb`, plus `+me` for
/// the media-extension profiles (`NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1` / `_2_SLICE_REV1`), with GB as
/// NVIDIA's go-nvlib computes it (`getMigMemorySizeGB`, the names nvidia-mig-parted and the k8s device
/// plugin use): the profile's share of the GPU's memory rounded **up** to eighths, times the GPU's memory
/// in whole GiB rounded up, rounded to the nearest integer. E.g. an A100 80GB (81920 MiB): 9856 MiB → 1/8
/// → `1g.10gb`; 40192 MiB → 4/8 → `3g.40gb`.
///
/// Profiles newer than the v1 struct's drivers (`+gfx`, `-me`, `+me.all`) only exist with drivers that have
/// the v2 call, so their names always come from NVML.
pub fn derive_gi_name(index: u32, slices: u32, memory_mib: u64, gpu_memory_bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    const GIB: u64 = 1024 * 1024 * 1024;
    let gb = if gpu_memory_bytes == 0 {
        0
    } else {
        let share = (memory_mib as f64 * MIB) / gpu_memory_bytes as f64;
        let eighths = (share * 8.0).ceil() / 8.0;
        let total_gib = gpu_memory_bytes.div_ceil(GIB) as f64;
        (eighths * total_gib).round() as u64
    };
    let suffix = match index {
        nvml_wrapper_sys::bindings::NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1
        | nvml_wrapper_sys::bindings::NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1 => "+me",
        _ => "",
    };
    format!("{slices}g.{gb}gb{suffix}")
}

/// Finds the profile called `name` (with or without `"MIG "`, ASCII case-insensitive) in `profiles`.
pub fn resolve<'p>(profiles: &'p [GiProfile], name: &str) -> Option<&'p GiProfile> {
    let wanted = normalize_name(name);
    profiles
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A100_80: u64 = 81920 * 1024 * 1024;
    const A100_40: u64 = 40960 * 1024 * 1024;
    const H100_80: u64 = 81559 * 1024 * 1024;

    #[test]
    fn names_from_nvml_lose_the_mig_prefix() {
        assert_eq!(normalize_name("MIG 1g.10gb"), "1g.10gb");
        assert_eq!(normalize_name(" MIG  3g.40gb "), "3g.40gb");
        assert_eq!(normalize_name("7g.80gb"), "7g.80gb");
    }

    #[test]
    fn derived_names_match_nvidias_for_a100_80gb() {
        // memorySizeMB of the A100-SXM4-80GB profiles (nvidia-smi mig -lgip, R535)
        assert_eq!(derive_gi_name(0, 1, 9856, A100_80), "1g.10gb");
        assert_eq!(derive_gi_name(7, 1, 9856, A100_80), "1g.10gb+me");
        assert_eq!(derive_gi_name(9, 1, 19968, A100_80), "1g.20gb");
        assert_eq!(derive_gi_name(1, 2, 19968, A100_80), "2g.20gb");
        assert_eq!(derive_gi_name(2, 3, 40192, A100_80), "3g.40gb");
        assert_eq!(derive_gi_name(3, 4, 40192, A100_80), "4g.40gb");
        assert_eq!(derive_gi_name(4, 7, 80384, A100_80), "7g.80gb");
    }

    #[test]
    fn derived_names_match_nvidias_for_a100_40gb_and_h100() {
        assert_eq!(derive_gi_name(0, 1, 4864, A100_40), "1g.5gb");
        assert_eq!(derive_gi_name(1, 2, 9984, A100_40), "2g.10gb");
        assert_eq!(derive_gi_name(2, 3, 19968, A100_40), "3g.20gb");
        assert_eq!(derive_gi_name(4, 7, 40192, A100_40), "7g.40gb");
        // H100 80GB HBM3 (81559 MiB, 80 GiB rounded up): 9.75, 39.25 and 79.25 GiB profiles
        assert_eq!(derive_gi_name(0, 1, 9984, H100_80), "1g.10gb");
        assert_eq!(derive_gi_name(2, 3, 40192, H100_80), "3g.40gb");
        assert_eq!(derive_gi_name(4, 7, 81152, H100_80), "7g.80gb");
    }

    #[test]
    fn derived_name_on_unknown_memory_does_not_divide_by_zero() {
        assert_eq!(derive_gi_name(0, 1, 9856, 0), "1g.0gb");
    }

    fn profile(index: u32, id: u32, name: &str) -> GiProfile {
        GiProfile {
            index,
            id,
            name: name.to_owned(),
            name_source: NameSource::Nvml,
            slices: 1,
            instance_count: 7,
            multiprocessors: 14,
            memory_mib: 9856,
        }
    }

    #[test]
    fn resolve_by_name_ignores_prefix_and_case() {
        let table = [profile(0, 19, "1g.10gb"), profile(7, 20, "1g.10gb+me")];
        assert_eq!(resolve(&table, "1g.10gb").map(|p| p.id), Some(19));
        assert_eq!(resolve(&table, "MIG 1G.10GB+ME").map(|p| p.id), Some(20));
        assert_eq!(resolve(&table, "1g.10").map(|p| p.id), None);
        assert_eq!(resolve(&table, "2g.20gb").map(|p| p.id), None);
    }

    #[test]
    fn placements_overlap_on_shared_slices_only() {
        let p = |start, size| Placement { start, size };
        assert!(p(0, 4).overlaps(p(3, 1)));
        assert!(!p(0, 4).overlaps(p(4, 4)));
        assert!(p(0, 8).overlaps(p(6, 1)));
        assert!(!p(6, 1).overlaps(p(0, 6)));
        assert_eq!(p(4, 4).to_string(), "4:4");
    }
}
