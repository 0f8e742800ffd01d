//! The few CUDA driver and NVML ABI facts this library needs, declared by hand (no CUDA headers).
//!
//! Values and layouts are from NVIDIA's `cuda.h` / `nvml.h` (CUDA 11.x–13.x keep them stable).

use std::ffi::{c_int, c_uint, c_void};

/// `CUresult` (an `enum`, passed as `int`).
pub(crate) type CUresult = c_int;
/// `nvmlReturn_t` (an `enum`, passed as `int`).
pub(crate) type NvmlReturn = c_int;
/// `CUdevice`: a device ordinal.
pub(crate) type CUdevice = c_int;
/// `CUdeviceptr` (`_v2`): a 64-bit device address.
pub(crate) type CUdeviceptr = u64;
/// `CUdeviceptr_v1`: the 32-bit address of the pre-3.2 (unversioned) entry points.
pub(crate) type CUdeviceptrV1 = c_uint;
/// Opaque driver handles (`CUstream`, `CUfunction`, `CUarray`, `CUmemoryPool`, `nvmlDevice_t`, ...).
pub(crate) type Handle = *mut c_void;
/// `CUmemGenericAllocationHandle`.
pub(crate) type CUmemGenericAllocationHandle = u64;

pub(crate) const CUDA_SUCCESS: CUresult = 0;
pub(crate) const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
/// `CU_MEM_ATTACH_GLOBAL` for `cuMemAllocManaged`.
pub(crate) const CU_MEM_ATTACH_GLOBAL: c_uint = 1;
pub(crate) const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
/// A launch refused because its device's SM cap cannot be enforced (`policy/sm/watcher.rs`).
pub(crate) const CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: CUresult = 701;
pub(crate) const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
/// `CUDA_ERROR_UNKNOWN` (999) and `NVML_ERROR_UNKNOWN` (999) happen to be equal: one value for
/// "a hook failed internally" whichever library the hook belongs to.
pub(crate) const ERROR_UNKNOWN: c_int = 999;

pub(crate) const NVML_SUCCESS: NvmlReturn = 0;
pub(crate) const NVML_ERROR_LIBRARY_NOT_FOUND: NvmlReturn = 12;
pub(crate) const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
pub(crate) const CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM: u64 = 2;
/// `CU_MEM_ALLOC_GRANULARITY_MINIMUM`.
pub(crate) const CU_MEM_ALLOC_GRANULARITY_MINIMUM: c_int = 0;

/// `CU_MEM_LOCATION_TYPE_DEVICE`.
pub(crate) const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;

/// The prefix of `CUmemAllocationProp` this library reads (`type`, `requestedHandleTypes`,
/// `location.{type,id}`); the caller's struct is larger, only these fields are touched.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CUmemAllocationPropHead {
    pub(crate) alloc_type: c_int,
    pub(crate) requested_handle_types: c_int,
    pub(crate) location_type: c_int,
    pub(crate) location_id: c_int,
}

/// `CUDA_MEM_ALLOC_NODE_PARAMS_v1` (`cuGraphAddMemAllocNode`): a `CUmemPoolProps` (88 bytes, of
/// which only `allocType`, `handleTypes` and `location` are named here), the access
/// descriptors, the size, and the device address the driver writes back.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemAllocNodeParams {
    pub(crate) alloc_type: c_int,
    pub(crate) handle_types: c_int,
    pub(crate) location_type: c_int,
    pub(crate) location_id: c_int,
    /// `win32SecurityAttributes`, `maxSize`, `usage`, `reserved[54]`.
    pub(crate) pool_rest: [u8; 72],
    pub(crate) access_descs: *const c_void,
    pub(crate) access_desc_count: usize,
    pub(crate) bytesize: usize,
    pub(crate) dptr: CUdeviceptr,
}

/// `CU_STREAM_CAPTURE_STATUS_ACTIVE` (`cuStreamIsCapturing`).
pub(crate) const CU_STREAM_CAPTURE_STATUS_ACTIVE: c_int = 1;

/// `CUDA_ARRAY_DESCRIPTOR` (`_v2`, `size_t` extents).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArrayDescriptor {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) format: c_int,
    pub(crate) num_channels: c_uint,
}

/// `CUDA_ARRAY_DESCRIPTOR_v1` (`unsigned int` extents; the unversioned `cuArrayCreate`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArrayDescriptorV1 {
    pub(crate) width: c_uint,
    pub(crate) height: c_uint,
    pub(crate) format: c_int,
    pub(crate) num_channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR` (`_v2`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Array3DDescriptor {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) depth: usize,
    pub(crate) format: c_int,
    pub(crate) num_channels: c_uint,
    pub(crate) flags: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR_v1`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Array3DDescriptorV1 {
    pub(crate) width: c_uint,
    pub(crate) height: c_uint,
    pub(crate) depth: c_uint,
    pub(crate) format: c_int,
    pub(crate) num_channels: c_uint,
    pub(crate) flags: c_uint,
}

/// Bytes per channel element of a `CUarray_format`; `None` for block-compressed and video formats,
/// whose size this skeleton does not estimate (they are counted at 4 bytes per element).
pub(crate) fn array_format_bytes(format: c_int) -> Option<u64> {
    match format {
        0x01 | 0x08 | 0x11 => Some(1), // UNSIGNED_INT8, SIGNED_INT8, (reserved 8-bit)
        0x02 | 0x09 | 0x10 => Some(2), // UNSIGNED_INT16, SIGNED_INT16, HALF
        0x03 | 0x0a | 0x20 => Some(4), // UNSIGNED_INT32, SIGNED_INT32, FLOAT
        _ => None,
    }
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NvmlMemory {
    pub(crate) total: u64,
    pub(crate) free: u64,
    pub(crate) used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NvmlMemoryV2 {
    pub(crate) version: c_uint,
    pub(crate) total: u64,
    pub(crate) reserved: u64,
    pub(crate) free: u64,
    pub(crate) used: u64,
}

/// `NVML_DEVICE_UUID_V2_BUFFER_SIZE`.
pub(crate) const NVML_UUID_BUFFER: usize = 96;

/// `CUlaunchConfig` (only ever passed through; its layout is the driver's business).
pub(crate) type LaunchConfig = c_void;

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcessSample {
    pub(crate) pid: c_uint,
    pub(crate) time_stamp: u64,
    pub(crate) sm_util: c_uint,
    pub(crate) mem_util: c_uint,
    pub(crate) enc_util: c_uint,
    pub(crate) dec_util: c_uint,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Utilization {
    pub(crate) gpu: c_uint,
    pub(crate) memory: c_uint,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!(offset_of!(CUmemAllocationPropHead, location_id), 12);
        assert_eq!(size_of::<ArrayDescriptor>(), 24);
        assert_eq!(size_of::<ArrayDescriptorV1>(), 16);
        assert_eq!(size_of::<Array3DDescriptor>(), 40);
        assert_eq!(size_of::<Array3DDescriptorV1>(), 24);
        assert_eq!(offset_of!(NvmlMemoryV2, total), 8);
        assert_eq!(offset_of!(NvmlMemoryV2, used), 32);
        assert_eq!(size_of::<NvmlMemoryV2>(), 40);
        assert_eq!(offset_of!(MemAllocNodeParams, access_descs), 88);
        assert_eq!(offset_of!(MemAllocNodeParams, bytesize), 104);
        assert_eq!(offset_of!(MemAllocNodeParams, dptr), 112);
        assert_eq!(size_of::<MemAllocNodeParams>(), 120);
    }
}
