//! [`MigGpu`]: [`MigBackend`] over the NVML library nvml-wrapper loaded. Every `unsafe` block of the crate is
//! in this file.
//!
//! # Why the unsafe code is sound
//!
//! * **Functions.** Each is a field of nvml-wrapper-sys's `NvmlLib` (bindgen from NVIDIA's `nvml.h`, so the
//!   signature is the real one), looked up when nvml-wrapper loaded the library; a missing one is
//!   [`MigError::FunctionMissing`], never called. The library stays loaded and initialised while the
//!   `Nvml` lives, and a [`MigGpu`] borrows a `Device` that borrows that `Nvml`.
//! * **The parent handle** is the one the `Device` wraps (`Device::handle`, unsafe only "to prevent it from
//!   being used without care"): valid while the `Device`'s `Nvml` is, i.e. for the [`MigGpu`]'s life.
//! * **GPU and compute instance handles never leave a method.** The public API names instances by id; each
//!   method looks the handle up (`nvmlDeviceGetGpuInstanceById`, `nvmlGpuInstanceGetComputeInstanceById`)
//!   (or, where the library lacks the latter, finds it among `nvmlGpuInstanceGetComputeInstances`) and
//!   uses it at once, destroying it only as its last use. A destroyed instance's id is simply
//!   `NVML_ERROR_NOT_FOUND` the next time, never a dangling handle. MIG device handles likewise: fetched
//!   by `mig_devices`/`processes` (nvml-wrapper's `mig_device_by_index`) and used within that call.
//!   Every method that holds such a handle takes one process-wide lock (`INSTANCES`), so another thread
//!   of this process cannot destroy the instance between the lookup and the use. (Another *process*
//!   repartitioning the same GPU at the same time is outside what NVML itself makes safe; the agent is
//!   the one process that repartitions.)
//! * **Out-parameters** point to locals or to `Vec`s at least as long as the count passed (and at least as
//!   long as NVML documents it may write: the profile's `instanceCount`); counts are checked against the
//!   buffer before anything is read back. Structs are built field by field (no `mem::zeroed`), with the
//!   `version` word `nvml.h`'s `NVML_STRUCT_VERSION` gives, and their sizes are asserted at compile time.

use std::os::raw::{c_char, c_uint};
use std::ptr;

use nvml_wrapper::Device;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings as ffi;
use nvml_wrapper_sys::bindings::{
    NvmlLib, nvmlComputeInstance_t, nvmlComputeInstanceInfo_t, nvmlComputeInstancePlacement_t,
    nvmlComputeInstanceProfileInfo_t, nvmlComputeInstanceProfileInfo_v2_t, nvmlDevice_t,
    nvmlGpuInstance_t, nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t,
    nvmlGpuInstanceProfileInfo_t, nvmlGpuInstanceProfileInfo_v2_t, nvmlReturn_t,
};

use crate::backend::{ComputeInstance, GpuInstance, Holder, MigBackend, MigDevice, MigMode};
use crate::error::{MigError, NvmlCode};
use crate::profile::{CiProfile, GiProfile, NameSource, Placement, derive_gi_name, normalize_name};

const SUCCESS: nvmlReturn_t = ffi::nvmlReturn_enum_NVML_SUCCESS;

/// Held by every [`MigBackend`] method that looks up and uses GPU instance, compute instance or MIG device
/// handles (none of them calls another), so no thread of this process destroys an instance while another
/// holds its handle.
static INSTANCES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn instances_lock() -> std::sync::MutexGuard<'static, ()> {
    // the guarded data is `()`: a panic while holding it leaves nothing inconsistent
    INSTANCES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// nvml.h: #define NVML_STRUCT_VERSION(data, ver) (unsigned int)(sizeof(nvml ## data ## _v ## ver ## _t) | (ver << 24U))
const _: () = assert!(size_of::<nvmlGpuInstanceProfileInfo_v2_t>() == 152);
const _: () = assert!(size_of::<nvmlGpuInstanceProfileInfo_t>() == 48);
const _: () = assert!(size_of::<nvmlComputeInstanceProfileInfo_v2_t>() == 136);
const _: () = assert!(size_of::<nvmlComputeInstanceProfileInfo_t>() == 36);
const _: () = assert!(size_of::<nvmlGpuInstanceInfo_t>() == 24);
const _: () = assert!(size_of::<nvmlComputeInstanceInfo_t>() == 32);
/// `nvmlGpuInstanceProfileInfo_v2`
const GI_PROFILE_INFO_V2: c_uint =
    size_of::<nvmlGpuInstanceProfileInfo_v2_t>() as c_uint | (2 << 24);
/// `nvmlComputeInstanceProfileInfo_v2`
const CI_PROFILE_INFO_V2: c_uint =
    size_of::<nvmlComputeInstanceProfileInfo_v2_t>() as c_uint | (2 << 24);

/// Instance buffers hold at least this many entries, whatever a profile's `instanceCount` says (no GPU has
/// more than 8 memory slices, so more than 8 instances of a profile): a margin against a driver that writes
/// more than it advertised.
const MIN_INSTANCE_BUFFER: usize = 32;

/// One GPU's MIG operations through NVML. Borrows the `Device` (so the library stays initialised); not
/// `Send` (it holds the raw handle), like nvml-wrapper's `Device` in practice.
pub struct MigGpu<'d, 'nvml> {
    device: &'d Device<'nvml>,
    lib: &'nvml NvmlLib,
    handle: nvmlDevice_t,
    gpu: String,
}

impl std::fmt::Debug for MigGpu<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigGpu").field("gpu", &self.gpu).finish()
    }
}

fn c_name(name: &[c_char]) -> Option<String> {
    let bytes: Vec<u8> = name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

fn gi_info_empty() -> nvmlGpuInstanceInfo_t {
    nvmlGpuInstanceInfo_t {
        device: ptr::null_mut(),
        id: 0,
        profileId: 0,
        placement: nvmlGpuInstancePlacement_t { start: 0, size: 0 },
    }
}

fn ci_info_empty() -> nvmlComputeInstanceInfo_t {
    nvmlComputeInstanceInfo_t {
        device: ptr::null_mut(),
        gpuInstance: ptr::null_mut(),
        id: 0,
        profileId: 0,
        placement: nvmlComputeInstancePlacement_t { start: 0, size: 0 },
    }
}

fn gi_from(info: &nvmlGpuInstanceInfo_t) -> GpuInstance {
    GpuInstance {
        id: info.id,
        profile_id: info.profileId,
        placement: Placement {
            start: info.placement.start,
            size: info.placement.size,
        },
    }
}

fn ci_from(gi: u32, info: &nvmlComputeInstanceInfo_t) -> ComputeInstance {
    ComputeInstance {
        id: info.id,
        gi_id: gi,
        profile_id: info.profileId,
        placement: Placement {
            start: info.placement.start,
            size: info.placement.size,
        },
    }
}

/// NOT_SUPPORTED / INVALID_ARGUMENT from a profile-info call: this profile index does not exist here.
fn absent_profile(code: nvmlReturn_t) -> bool {
    code == ffi::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED
        || code == ffi::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
}

impl<'d, 'nvml> MigGpu<'d, 'nvml> {
    /// The MIG operations of `device` (a physical GPU, not a MIG device).
    pub fn new(device: &'d Device<'nvml>) -> Self {
        // SAFETY: `Device::handle` only returns the handle the `Device` was built with (nvml-wrapper marks it
        // unsafe so callers think about its lifetime). It stays valid while the `Nvml` the `Device` borrows
        // is alive, and `Self` borrows `device` for `'d`, so every use below happens within that life.
        let handle = unsafe { device.handle() };
        let gpu = match device.uuid() {
            Ok(uuid) => uuid,
            Err(_) => match device.index() {
                Ok(i) => format!("index {i}"),
                Err(_) => "GPU ?".to_owned(),
            },
        };
        Self {
            device,
            lib: device.nvml().lib(),
            handle,
            gpu,
        }
    }

    /// The nvml-wrapper `Device` this wraps.
    pub fn device(&self) -> &'d Device<'nvml> {
        self.device
    }

    fn sym<'a, T, E>(
        &self,
        f: &'a Result<T, E>,
        function: &'static str,
        profile: Option<&str>,
    ) -> Result<&'a T, MigError> {
        f.as_ref().map_err(|_| MigError::FunctionMissing {
            gpu: self.gpu.clone(),
            function,
            profile: profile.map(str::to_owned),
        })
    }

    fn check(
        &self,
        code: nvmlReturn_t,
        function: &'static str,
        profile: Option<&str>,
    ) -> Result<(), MigError> {
        if code == SUCCESS {
            return Ok(());
        }
        if code == ffi::nvmlReturn_enum_NVML_ERROR_IN_USE {
            return Err(MigError::InUse {
                gpu: self.gpu.clone(),
                detail: format!(
                    "{function} returned NVML_ERROR_IN_USE{}",
                    profile
                        .map(|p| format!(" (profile {p})"))
                        .unwrap_or_default()
                ),
                pids: Vec::new(),
            });
        }
        Err(MigError::Nvml {
            gpu: self.gpu.clone(),
            function,
            profile: profile.map(str::to_owned),
            code: NvmlCode(code),
        })
    }

    fn wrapper(&self, function: &'static str) -> impl Fn(NvmlError) -> MigError + '_ {
        move |source| match source {
            NvmlError::InUse => MigError::InUse {
                gpu: self.gpu.clone(),
                detail: format!("{function} returned NVML_ERROR_IN_USE"),
                pids: Vec::new(),
            },
            source => MigError::Wrapper {
                gpu: self.gpu.clone(),
                function,
                source,
            },
        }
    }

    fn total_memory(&self) -> u64 {
        self.device.memory_info().map(|m| m.total).unwrap_or(0)
    }

    /// One GPU instance profile by index; `None` if the GPU does not have it.
    pub fn gi_profile(&self, index: u32) -> Result<Option<GiProfile>, MigError> {
        if let Ok(f) = self.lib.nvmlDeviceGetGpuInstanceProfileInfoV.as_ref() {
            let mut info = nvmlGpuInstanceProfileInfo_v2_t {
                version: GI_PROFILE_INFO_V2,
                id: 0,
                isP2pSupported: 0,
                sliceCount: 0,
                instanceCount: 0,
                multiprocessorCount: 0,
                copyEngineCount: 0,
                decoderCount: 0,
                encoderCount: 0,
                jpegCount: 0,
                ofaCount: 0,
                memorySizeMB: 0,
                name: [0; 96],
            };
            // SAFETY: `f` is nvmlDeviceGetGpuInstanceProfileInfoV from the loaded library (real signature);
            // `self.handle` is valid for `self`'s life (see `new`); `info` is a live local of the v2 layout
            // with the v2 version word, the struct this function writes.
            let code = unsafe { f(self.handle, index, &mut info) };
            if code == SUCCESS {
                let raw = c_name(&info.name).ok_or_else(|| MigError::Unexpected {
                    gpu: self.gpu.clone(),
                    function: "nvmlDeviceGetGpuInstanceProfileInfoV",
                    detail: format!("profile {index}: name is not UTF-8"),
                })?;
                let (name, name_source) = if normalize_name(&raw).is_empty() {
                    let derived = derive_gi_name(
                        index,
                        info.sliceCount,
                        info.memorySizeMB,
                        self.total_memory(),
                    );
                    (derived, NameSource::Derived)
                } else {
                    (normalize_name(&raw).to_owned(), NameSource::Nvml)
                };
                return Ok(Some(GiProfile {
                    index,
                    id: info.id,
                    name,
                    name_source,
                    slices: info.sliceCount,
                    instance_count: info.instanceCount,
                    multiprocessors: info.multiprocessorCount,
                    memory_mib: info.memorySizeMB,
                }));
            }
            if absent_profile(code) {
                return Ok(None);
            }
            if code != ffi::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH {
                self.check(code, "nvmlDeviceGetGpuInstanceProfileInfoV", None)?;
            }
            // a driver that does not know the v2 struct: fall back to v1 below
        }
        self.gi_profile_v1(index)
    }

    /// `nvmlDeviceGetGpuInstanceProfileInfo` (v1, no name: derived, see [`derive_gi_name`]).
    fn gi_profile_v1(&self, index: u32) -> Result<Option<GiProfile>, MigError> {
        let f = self.sym(
            &self.lib.nvmlDeviceGetGpuInstanceProfileInfo,
            "nvmlDeviceGetGpuInstanceProfileInfo",
            None,
        )?;
        let mut info = nvmlGpuInstanceProfileInfo_t {
            id: 0,
            isP2pSupported: 0,
            sliceCount: 0,
            instanceCount: 0,
            multiprocessorCount: 0,
            copyEngineCount: 0,
            decoderCount: 0,
            encoderCount: 0,
            jpegCount: 0,
            ofaCount: 0,
            memorySizeMB: 0,
        };
        // SAFETY: `f` is nvmlDeviceGetGpuInstanceProfileInfo (real signature); valid parent handle (see
        // `new`); `info` is a live local of the v1 layout this function writes.
        let code = unsafe { f(self.handle, index, &mut info) };
        if absent_profile(code) {
            return Ok(None);
        }
        self.check(code, "nvmlDeviceGetGpuInstanceProfileInfo", None)?;
        Ok(Some(GiProfile {
            index,
            id: info.id,
            name: derive_gi_name(
                index,
                info.sliceCount,
                info.memorySizeMB,
                self.total_memory(),
            ),
            name_source: NameSource::Derived,
            slices: info.sliceCount,
            instance_count: info.instanceCount,
            multiprocessors: info.multiprocessorCount,
            memory_mib: info.memorySizeMB,
        }))
    }

    /// The handle of GPU instance `id`, for immediate use within one method.
    fn gi_handle(&self, id: u32) -> Result<nvmlGpuInstance_t, MigError> {
        let f = self.sym(
            &self.lib.nvmlDeviceGetGpuInstanceById,
            "nvmlDeviceGetGpuInstanceById",
            None,
        )?;
        let mut gi: nvmlGpuInstance_t = ptr::null_mut();
        // SAFETY: `f` is nvmlDeviceGetGpuInstanceById (real signature); valid parent handle (see `new`);
        // `gi` is a live local the function writes one handle into.
        let code = unsafe { f(self.handle, id, &mut gi) };
        self.check(code, "nvmlDeviceGetGpuInstanceById", None)?;
        Ok(gi)
    }

    /// `nvmlGpuInstanceGetInfo` on a handle just obtained.
    fn gi_info(
        &self,
        gi: nvmlGpuInstance_t,
        profile: Option<&str>,
    ) -> Result<GpuInstance, MigError> {
        let f = self.sym(
            &self.lib.nvmlGpuInstanceGetInfo,
            "nvmlGpuInstanceGetInfo",
            profile,
        )?;
        let mut info = gi_info_empty();
        // SAFETY: `f` is nvmlGpuInstanceGetInfo (real signature); `gi` was returned by NVML in the calling
        // method, which has not destroyed it; `info` is a live local of the layout the function writes.
        let code = unsafe { f(gi, &mut info) };
        self.check(code, "nvmlGpuInstanceGetInfo", profile)?;
        Ok(gi_from(&info))
    }

    /// The handle of compute instance `ci` of GPU instance handle `gi`, for immediate use:
    /// `nvmlGpuInstanceGetComputeInstanceById`, or, where the library lacks it, the instance of that id
    /// among those `nvmlGpuInstanceGetComputeInstances` lists.
    fn ci_handle(
        &self,
        gi_id: u32,
        gi: nvmlGpuInstance_t,
        ci: u32,
    ) -> Result<nvmlComputeInstance_t, MigError> {
        let function = "nvmlGpuInstanceGetComputeInstanceById";
        if let Ok(f) = self.lib.nvmlGpuInstanceGetComputeInstanceById.as_ref() {
            let mut h: nvmlComputeInstance_t = ptr::null_mut();
            // SAFETY: `f` is nvmlGpuInstanceGetComputeInstanceById (real signature); `gi` was just looked
            // up by the caller and not destroyed; `h` is a live local the function writes one handle into.
            let code = unsafe { f(gi, ci, &mut h) };
            self.check(code, function, None)?;
            return Ok(h);
        }
        for index in 0..ffi::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            let Some(profile) = self.ci_profile(gi, index)? else {
                continue;
            };
            for h in self.ci_handles(gi, &profile)? {
                if self.ci_info(gi_id, h, None)?.id == ci {
                    return Ok(h);
                }
            }
        }
        Err(MigError::Nvml {
            gpu: self.gpu.clone(),
            function: "nvmlGpuInstanceGetComputeInstances",
            profile: None,
            code: NvmlCode::NOT_FOUND,
        })
    }

    /// The handles of `profile`'s compute instances in GPU instance handle `gi`, for immediate use.
    fn ci_handles(
        &self,
        gi: nvmlGpuInstance_t,
        profile: &CiProfile,
    ) -> Result<Vec<nvmlComputeInstance_t>, MigError> {
        let function = "nvmlGpuInstanceGetComputeInstances";
        let f = self.sym(&self.lib.nvmlGpuInstanceGetComputeInstances, function, None)?;
        let len = (profile.instance_count as usize).max(MIN_INSTANCE_BUFFER);
        let mut cis: Vec<nvmlComputeInstance_t> = vec![ptr::null_mut(); len];
        let mut count = len as c_uint;
        // SAFETY: `f` is nvmlGpuInstanceGetComputeInstances (real signature); `gi` was just looked up by
        // the caller and not destroyed; `cis` has room for `len` ≥ the profile's instanceCount handles,
        // `count` is a live local.
        let code = unsafe { f(gi, profile.id, cis.as_mut_ptr(), &mut count) };
        self.check(code, function, None)?;
        if count as usize > len {
            return Err(MigError::Unexpected {
                gpu: self.gpu.clone(),
                function,
                detail: format!("{count} instances written into room for {len}"),
            });
        }
        cis.truncate(count as usize);
        Ok(cis)
    }

    /// `nvmlComputeInstanceGetInfo_v2` on a handle just obtained (the v1 name is only bound by nvml-wrapper-sys's
    /// `legacy-functions`; current drivers export `_v2`).
    fn ci_info(
        &self,
        gi_id: u32,
        ci: nvmlComputeInstance_t,
        profile: Option<&str>,
    ) -> Result<ComputeInstance, MigError> {
        let function = "nvmlComputeInstanceGetInfo_v2";
        let f = self.sym(&self.lib.nvmlComputeInstanceGetInfo_v2, function, profile)?;
        let mut info = ci_info_empty();
        // SAFETY: `f` is nvmlComputeInstanceGetInfo_v2 (real signature); `ci` was returned by
        // NVML in the calling method and not destroyed; `info` is a live local of the layout it writes.
        let code = unsafe { f(ci, &mut info) };
        self.check(code, function, profile)?;
        Ok(ci_from(gi_id, &info))
    }

    /// One compute instance profile of GPU instance handle `gi` by index; `None` if absent.
    fn ci_profile(&self, gi: nvmlGpuInstance_t, index: u32) -> Result<Option<CiProfile>, MigError> {
        let engine = ffi::NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED;
        if let Ok(f) = self
            .lib
            .nvmlGpuInstanceGetComputeInstanceProfileInfoV
            .as_ref()
        {
            let mut info = nvmlComputeInstanceProfileInfo_v2_t {
                version: CI_PROFILE_INFO_V2,
                id: 0,
                sliceCount: 0,
                instanceCount: 0,
                multiprocessorCount: 0,
                sharedCopyEngineCount: 0,
                sharedDecoderCount: 0,
                sharedEncoderCount: 0,
                sharedJpegCount: 0,
                sharedOfaCount: 0,
                name: [0; 96],
            };
            // SAFETY: `f` is nvmlGpuInstanceGetComputeInstanceProfileInfoV (real signature); `gi` was just
            // looked up by the caller and not destroyed; `info` is a live local of the v2 layout with the
            // v2 version word.
            let code = unsafe { f(gi, index, engine, &mut info) };
            if code == SUCCESS {
                let name = c_name(&info.name).unwrap_or_default();
                return Ok(Some(CiProfile {
                    index,
                    id: info.id,
                    name: normalize_name(&name).to_owned(),
                    slices: info.sliceCount,
                    instance_count: info.instanceCount,
                    multiprocessors: info.multiprocessorCount,
                }));
            }
            if absent_profile(code) {
                return Ok(None);
            }
            if code != ffi::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH {
                self.check(code, "nvmlGpuInstanceGetComputeInstanceProfileInfoV", None)?;
            }
        }
        let f = self.sym(
            &self.lib.nvmlGpuInstanceGetComputeInstanceProfileInfo,
            "nvmlGpuInstanceGetComputeInstanceProfileInfo",
            None,
        )?;
        let mut info = nvmlComputeInstanceProfileInfo_t {
            id: 0,
            sliceCount: 0,
            instanceCount: 0,
            multiprocessorCount: 0,
            sharedCopyEngineCount: 0,
            sharedDecoderCount: 0,
            sharedEncoderCount: 0,
            sharedJpegCount: 0,
            sharedOfaCount: 0,
        };
        // SAFETY: `f` is nvmlGpuInstanceGetComputeInstanceProfileInfo (real signature); `gi` just looked up
        // and not destroyed; `info` is a live local of the v1 layout it writes.
        let code = unsafe { f(gi, index, engine, &mut info) };
        if absent_profile(code) {
            return Ok(None);
        }
        self.check(code, "nvmlGpuInstanceGetComputeInstanceProfileInfo", None)?;
        Ok(Some(CiProfile {
            index,
            id: info.id,
            name: String::new(),
            slices: info.sliceCount,
            instance_count: info.instanceCount,
            multiprocessors: info.multiprocessorCount,
        }))
    }

    /// GPU instance id and compute instance id of a MIG device handle `mig_devices` has just fetched (kept
    /// private: a MIG device handle kept across a destroy is not something to hand to raw calls).
    fn mig_device_ids(&self, mig: &Device<'_>) -> Result<(u32, u32), MigError> {
        // SAFETY: as in `new`: the handle `mig` was built with, valid while its `Nvml` lives, which the
        // borrow of `mig` outlasts.
        let handle = unsafe { mig.handle() };
        let gi_f = self.sym(
            &self.lib.nvmlDeviceGetGpuInstanceId,
            "nvmlDeviceGetGpuInstanceId",
            None,
        )?;
        let ci_f = self.sym(
            &self.lib.nvmlDeviceGetComputeInstanceId,
            "nvmlDeviceGetComputeInstanceId",
            None,
        )?;
        let (mut gi, mut ci): (c_uint, c_uint) = (0, 0);
        // SAFETY: `gi_f` is nvmlDeviceGetGpuInstanceId (real signature); `handle` is valid (above); `gi`
        // is a live local.
        let code = unsafe { gi_f(handle, &mut gi) };
        self.check(code, "nvmlDeviceGetGpuInstanceId", None)?;
        // SAFETY: `ci_f` is nvmlDeviceGetComputeInstanceId (real signature); `handle` is valid (above);
        // `ci` is a live local.
        let code = unsafe { ci_f(handle, &mut ci) };
        self.check(code, "nvmlDeviceGetComputeInstanceId", None)?;
        Ok((gi, ci))
    }

    /// The MIG devices that exist, as nvml-wrapper `Device`s with their index.
    fn mig_handles(&self) -> Result<Vec<(u32, Device<'nvml>)>, MigError> {
        let max = match self.device.mig_device_count() {
            Ok(n) => n,
            Err(NvmlError::NotSupported) => return Ok(Vec::new()),
            Err(e) => return Err(self.wrapper("nvmlDeviceGetMaxMigDeviceCount")(e)),
        };
        let mut out = Vec::new();
        for index in 0..max {
            match self.device.mig_device_by_index(index) {
                Ok(d) => out.push((index, d)),
                // an empty slot, or MIG mode off
                Err(NvmlError::NotFound | NvmlError::InvalidArg | NvmlError::NotSupported) => {}
                Err(e) => return Err(self.wrapper("nvmlDeviceGetMigDeviceHandleByIndex")(e)),
            }
        }
        Ok(out)
    }
}

/// Processes of one device: compute (`_v3`), and graphics if `graphics` (the parent GPU only: MIG devices
/// of the A100/H100 have no graphics support). `NotSupported` / `NoPermission` / a missing function count
/// as none (the destroy calls' `NVML_ERROR_IN_USE` is the backstop).
fn device_pids(device: &Device<'_>, graphics: bool) -> Result<Vec<u32>, (&'static str, NvmlError)> {
    let mut pids = Vec::new();
    let tolerable = |e: &NvmlError| {
        matches!(
            e,
            NvmlError::NotSupported | NvmlError::NoPermission | NvmlError::FailedToLoadSymbol(_)
        )
    };
    match device.running_compute_processes() {
        Ok(ps) => pids.extend(ps.iter().map(|p| p.pid)),
        Err(e) if tolerable(&e) => {}
        Err(e) => return Err(("nvmlDeviceGetComputeRunningProcesses_v3", e)),
    }
    if graphics {
        match device.running_graphics_processes() {
            Ok(ps) => pids.extend(ps.iter().map(|p| p.pid)),
            Err(e) if tolerable(&e) => {}
            Err(e) => return Err(("nvmlDeviceGetGraphicsRunningProcesses_v3", e)),
        }
    }
    Ok(pids)
}

impl MigBackend for MigGpu<'_, '_> {
    fn gpu(&self) -> &str {
        &self.gpu
    }

    fn mig_mode(&self) -> Result<MigMode, MigError> {
        match self.device.mig_mode() {
            Ok(m) => Ok(MigMode {
                current: m.current == ffi::NVML_DEVICE_MIG_ENABLE,
                pending: m.pending == ffi::NVML_DEVICE_MIG_ENABLE,
            }),
            Err(NvmlError::NotSupported) => Err(MigError::NotSupported {
                gpu: self.gpu.clone(),
                function: "nvmlDeviceGetMigMode",
            }),
            Err(e) => Err(self.wrapper("nvmlDeviceGetMigMode")(e)),
        }
    }

    fn set_mig_mode(&self, enabled: bool) -> Result<(), MigError> {
        match self.device.set_mig_mode(enabled) {
            // The activation status says whether the mode took effect now. IN_USE: the GPU could not be
            // reset under its users, and the new mode stays pending. Any other status: the caller reads
            // the mode back (`apply` reports a pending mode as `ResetPending`).
            Ok(activation) if activation == ffi::nvmlReturn_enum_NVML_ERROR_IN_USE => {
                Err(MigError::InUse {
                    gpu: self.gpu.clone(),
                    detail: format!(
                        "nvmlDeviceSetMigMode activation status {}; MIG mode {} is pending a GPU reset",
                        NvmlCode(activation),
                        if enabled { "enabled" } else { "disabled" }
                    ),
                    pids: Vec::new(),
                })
            }
            Ok(_) => Ok(()),
            Err(NvmlError::NotSupported) => Err(MigError::NotSupported {
                gpu: self.gpu.clone(),
                function: "nvmlDeviceSetMigMode",
            }),
            Err(e) => Err(self.wrapper("nvmlDeviceSetMigMode")(e)),
        }
    }

    fn gi_profiles(&self) -> Result<Vec<GiProfile>, MigError> {
        let mut out = Vec::new();
        for index in 0..ffi::NVML_GPU_INSTANCE_PROFILE_COUNT {
            if let Some(p) = self.gi_profile(index)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    fn gi_placements(&self, profile: &GiProfile) -> Result<Vec<Placement>, MigError> {
        let name = Some(profile.name.as_str());
        let function = "nvmlDeviceGetGpuInstancePossiblePlacements_v2";
        let f = self.sym(
            &self.lib.nvmlDeviceGetGpuInstancePossiblePlacements_v2,
            function,
            name,
        )?;
        let mut count: c_uint = 0;
        // SAFETY: `f` is nvmlDeviceGetGpuInstancePossiblePlacements_v2 (real signature); valid parent
        // handle (see `new`); a NULL `placements` asks only for the count (documented), written to the
        // live local `count`.
        let code = unsafe { f(self.handle, profile.id, ptr::null_mut(), &mut count) };
        if code != ffi::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE {
            self.check(code, function, name)?;
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
        let mut n = count;
        // SAFETY: as above, with `buf` holding `count` placements and `n` = `count` telling NVML so.
        let code = unsafe { f(self.handle, profile.id, buf.as_mut_ptr(), &mut n) };
        self.check(code, function, name)?;
        if n > count {
            return Err(MigError::Unexpected {
                gpu: self.gpu.clone(),
                function,
                detail: format!("{n} placements written into room for {count}"),
            });
        }
        buf.truncate(n as usize);
        Ok(buf
            .iter()
            .map(|p| Placement {
                start: p.start,
                size: p.size,
            })
            .collect())
    }

    fn gi_remaining_capacity(&self, profile: &GiProfile) -> Result<u32, MigError> {
        let name = Some(profile.name.as_str());
        let function = "nvmlDeviceGetGpuInstanceRemainingCapacity";
        let f = self.sym(
            &self.lib.nvmlDeviceGetGpuInstanceRemainingCapacity,
            function,
            name,
        )?;
        let mut count: c_uint = 0;
        // SAFETY: `f` is nvmlDeviceGetGpuInstanceRemainingCapacity (real signature); valid parent handle
        // (see `new`); `count` is a live local.
        let code = unsafe { f(self.handle, profile.id, &mut count) };
        self.check(code, function, name)?;
        Ok(count)
    }

    fn gpu_instances(&self, profile: &GiProfile) -> Result<Vec<GpuInstance>, MigError> {
        let _instances = instances_lock();
        let name = Some(profile.name.as_str());
        let function = "nvmlDeviceGetGpuInstances";
        let f = self.sym(&self.lib.nvmlDeviceGetGpuInstances, function, name)?;
        let len = (profile.instance_count as usize).max(MIN_INSTANCE_BUFFER);
        let mut handles: Vec<nvmlGpuInstance_t> = vec![ptr::null_mut(); len];
        let mut count = len as c_uint;
        // SAFETY: `f` is nvmlDeviceGetGpuInstances (real signature); valid parent handle (see `new`);
        // `handles` has room for `len` ≥ the profile's instanceCount handles (NVML's documented need), and
        // `count` is a live local.
        let code = unsafe { f(self.handle, profile.id, handles.as_mut_ptr(), &mut count) };
        self.check(code, function, name)?;
        if count as usize > len {
            return Err(MigError::Unexpected {
                gpu: self.gpu.clone(),
                function,
                detail: format!("{count} instances written into room for {len}"),
            });
        }
        handles[..count as usize]
            .iter()
            .map(|&gi| self.gi_info(gi, name))
            .collect()
    }

    fn create_gpu_instance(
        &self,
        profile: &GiProfile,
        placement: Placement,
    ) -> Result<GpuInstance, MigError> {
        let _instances = instances_lock();
        let name = Some(profile.name.as_str());
        let function = "nvmlDeviceCreateGpuInstanceWithPlacement";
        let f = self.sym(
            &self.lib.nvmlDeviceCreateGpuInstanceWithPlacement,
            function,
            name,
        )?;
        let at = nvmlGpuInstancePlacement_t {
            start: placement.start,
            size: placement.size,
        };
        let mut gi: nvmlGpuInstance_t = ptr::null_mut();
        // SAFETY: `f` is nvmlDeviceCreateGpuInstanceWithPlacement (real signature); valid parent handle (see
        // `new`); `at` is a live local read by NVML, `gi` a live local it writes the new handle into.
        let code = unsafe { f(self.handle, profile.id, &at, &mut gi) };
        self.check(code, function, name).map_err(|e| match e {
            MigError::Nvml {
                gpu,
                function,
                code,
                ..
            } => MigError::Nvml {
                gpu,
                function,
                code,
                profile: Some(format!("{} at {placement}", profile.name)),
            },
            e => e,
        })?;
        self.gi_info(gi, name)
    }

    fn destroy_gpu_instance(&self, gi: u32) -> Result<(), MigError> {
        let _instances = instances_lock();
        let function = "nvmlGpuInstanceDestroy";
        let f = self.sym(&self.lib.nvmlGpuInstanceDestroy, function, None)?;
        let handle = self.gi_handle(gi)?;
        // SAFETY: `f` is nvmlGpuInstanceDestroy (real signature); `handle` was just looked up by id and is
        // not used again after this call.
        let code = unsafe { f(handle) };
        self.check(code, function, None)
    }

    fn ci_profiles(&self, gi: u32) -> Result<Vec<CiProfile>, MigError> {
        let _instances = instances_lock();
        let handle = self.gi_handle(gi)?;
        let mut out = Vec::new();
        for index in 0..ffi::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            if let Some(p) = self.ci_profile(handle, index)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    fn compute_instances(
        &self,
        gi: u32,
        profile: &CiProfile,
    ) -> Result<Vec<ComputeInstance>, MigError> {
        let _instances = instances_lock();
        let handle = self.gi_handle(gi)?;
        self.ci_handles(handle, profile)?
            .into_iter()
            .map(|ci| self.ci_info(gi, ci, None))
            .collect()
    }

    fn create_compute_instance(
        &self,
        gi: u32,
        profile: &CiProfile,
    ) -> Result<ComputeInstance, MigError> {
        let _instances = instances_lock();
        let function = "nvmlGpuInstanceCreateComputeInstance";
        let name = (!profile.name.is_empty()).then_some(profile.name.as_str());
        let f = self.sym(
            &self.lib.nvmlGpuInstanceCreateComputeInstance,
            function,
            name,
        )?;
        let handle = self.gi_handle(gi)?;
        let mut ci: nvmlComputeInstance_t = ptr::null_mut();
        // SAFETY: `f` is nvmlGpuInstanceCreateComputeInstance (real signature); `handle` was just looked up
        // and not destroyed; `ci` is a live local NVML writes the new handle into.
        let code = unsafe { f(handle, profile.id, &mut ci) };
        self.check(code, function, name)?;
        self.ci_info(gi, ci, name)
    }

    fn destroy_compute_instance(&self, gi: u32, ci: u32) -> Result<(), MigError> {
        let _instances = instances_lock();
        let function = "nvmlComputeInstanceDestroy";
        let f = self.sym(&self.lib.nvmlComputeInstanceDestroy, function, None)?;
        let gi_handle = self.gi_handle(gi)?;
        let handle = self.ci_handle(gi, gi_handle, ci)?;
        // SAFETY: `f` is nvmlComputeInstanceDestroy (real signature); `handle` was just looked up by id and
        // is not used again after this call.
        let code = unsafe { f(handle) };
        self.check(code, function, None)
    }

    fn processes(&self) -> Result<Vec<Holder>, MigError> {
        let _instances = instances_lock();
        let mut out = Vec::new();
        let pids = device_pids(self.device, true).map_err(|(f, e)| self.wrapper(f)(e))?;
        out.extend(pids.into_iter().map(|pid| Holder {
            device: "GPU".to_owned(),
            pid,
        }));
        for (_, mig) in self.mig_handles()? {
            let uuid = mig
                .uuid()
                .map_err(self.wrapper("nvmlDeviceGetUUID (MIG device)"))?;
            let pids = device_pids(&mig, false).map_err(|(f, e)| self.wrapper(f)(e))?;
            for pid in pids {
                // the parent's list already holds every MIG device's processes when it can
                if !out.iter().any(|h| h.pid == pid) {
                    out.push(Holder {
                        device: uuid.clone(),
                        pid,
                    });
                }
            }
        }
        Ok(out)
    }

    fn mig_devices(&self) -> Result<Vec<MigDevice>, MigError> {
        let _instances = instances_lock();
        let mut out = Vec::new();
        for (index, mig) in self.mig_handles()? {
            let uuid = mig
                .uuid()
                .map_err(self.wrapper("nvmlDeviceGetUUID (MIG device)"))?;
            let memory_bytes = mig
                .memory_info()
                .map_err(self.wrapper("nvmlDeviceGetMemoryInfo (MIG device)"))?
                .total;
            let (gi_id, ci_id) = self.mig_device_ids(&mig)?;
            out.push(MigDevice {
                index,
                uuid,
                gi_id,
                ci_id,
                memory_bytes,
            });
        }
        Ok(out)
    }
}

/// The v1 profile path (what a driver without `nvmlDeviceGetGpuInstanceProfileInfoV` gives) against the
/// gpu-sim: names derived from slices and memory must equal the names NVML's v2 struct carries. Runs in a
/// child process, as the fake NVML reads its environment at init (see `tests/sim.rs`).
#[cfg(test)]
mod tests {
    use super::*;
    use gpu_sim::{GpuSpec, Mig, NodeSpec, SimNode};
    use nvml_wrapper::Nvml;

    const CHILD_ENV: &str = "NVML_MIG_UNIT_CHILD";

    #[test]
    fn derived_v1_names_equal_nvmls_v2_names_on_a100_and_h100() {
        let name = "nvml::tests::derived_v1_names_equal_nvmls_v2_names_on_a100_and_h100";
        if std::env::var(CHILD_ENV).is_ok_and(|v| v == name) {
            let nvml = Nvml::builder()
                .lib_path(gpu_sim::nvml_library().as_os_str())
                .init()
                .expect("nvmlInit_v2");
            for index in 0..2 {
                let device = nvml.device_by_index(index).expect("device");
                let gpu = MigGpu::new(&device);
                let v2 = gpu.gi_profiles().expect("v2 profiles");
                assert!(v2.len() >= 5, "{v2:?}");
                for p in &v2 {
                    assert_eq!(p.name_source, NameSource::Nvml);
                    let v1 = gpu
                        .gi_profile_v1(p.index)
                        .expect("v1 call")
                        .expect("same profile in v1");
                    assert_eq!(v1.name_source, NameSource::Derived);
                    assert_eq!(
                        (v1.name.as_str(), v1.id, v1.slices, v1.memory_mib),
                        (p.name.as_str(), p.id, p.slices, p.memory_mib),
                        "GPU {index} profile index {}",
                        p.index
                    );
                }
            }
            return;
        }
        let spec = NodeSpec::new(vec![
            GpuSpec::a100_80gb(0).with_mig(Mig::Enabled),
            GpuSpec::h100_80gb(1).with_mig(Mig::Enabled),
        ]);
        let node = SimNode::new(spec).expect("write node");
        let output = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, name)
            .env_remove(gpu_sim::ENV_NODE)
            .env_remove(gpu_sim::ENV_CONTROL)
            .envs(node.env())
            .output()
            .expect("spawn child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("test result: ok. 1 passed"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
