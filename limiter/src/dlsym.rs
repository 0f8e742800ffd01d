//! Our `dlsym`: how programs that `dlopen` the driver and `dlsym` its functions (the CUDA runtime
//! before 11.3, ctypes/pynvml, go-nvml, `cuGetProcAddress` itself) get the hooks.
//!
//! # Design (and why not HAMi-core's)
//!
//! The exported `dlsym` is a tiny x86_64 trampoline. It asks [`route`] whether this lookup is one
//! we answer; if not, it **tail-jumps** into glibc's `dlsym` with the caller's registers and return
//! address intact. glibc computes `RTLD_NEXT` (and the `RTLD_DEFAULT` scope) from the return
//! address, so for every lookup we do not answer, the result is exactly what it would be without
//! us — other interposers' `dlsym(RTLD_NEXT, …)` keep working (HAMi-core instead calls the real
//! `dlsym` from its own frame, which makes `RTLD_NEXT` relative to libvgpu, and adds a "recursive
//! dlsym" guard that returns NULL on a repeated lookup: HAMi#723).
//!
//! We answer only names that are rows of our table, with a handle other than `RTLD_NEXT`:
//! we call the real `dlsym` ourselves, and if the address it finds is the driver's own function
//! (the same address our lazy resolution gets from `libcuda.so.1`/`libnvidia-ml.so.1`), we return
//! our hook instead; if it is our own export (an `RTLD_DEFAULT` lookup), we return the hook only
//! when the driver really has the function — so a probe for `cuMemAlloc_v2` on a machine without
//! a driver still gets NULL; anything else (another library's function of that name) is returned
//! unchanged. `RTLD_NEXT` lookups of hooked names are passed through: glibc then finds our export
//! for callers loaded before us and the driver's for callers after us, which is what `RTLD_NEXT`
//! means.
//!
//! # Finding glibc's `dlsym`
//!
//! `dlvsym(RTLD_NEXT, "dlsym", v)` for v = `GLIBC_2.34` (glibc ≥ 2.34, where libdl merged into
//! libc), then `GLIBC_2.2.5` (x86_64 since the start; still a compat alias in new glibc), then
//! `GLIBC_2.17` (aarch64). We do not export `dlvsym`, so that call cannot recurse. glibc-private
//! entry points such as `__libc_dlsym`/`_dl_sym` are avoided: they change between releases.
//!
//! Caveats: an unversioned `dlsym` definition satisfies both `dlsym@GLIBC_2.2.5` and
//! `dlsym@GLIBC_2.34` references (glibc's symbol-version matching accepts an unversioned
//! definition). On other architectures a plain Rust function forwards instead of tail-jumping, so
//! there `RTLD_NEXT` lookups become relative to this library. The trampoline has no `endbr64`;
//! Linux userspace does not enforce IBT today.

use crate::real::{self, real_dlsym, real_dlsym_addr};
use crate::table::{hook_address, hooked_index};
use std::ffi::{CStr, c_char, c_void};

/// Decides a `dlsym(handle, symbol)` call. Returns the address of glibc's `dlsym` to tail-call with
/// the original arguments, or 0 when the answer has been stored in `*answer`.
extern "C" fn route(handle: *mut c_void, symbol: *const c_char, answer: *mut *mut c_void) -> usize {
    crate::guard::ffi(0, || {
        let real = real_dlsym_addr();
        // SAFETY: `symbol` is the caller's argument (checked for null) and `answer` points to the
        // trampoline's stack slot.
        match unsafe { decide(handle, symbol) } {
            Decision::Forward if real != 0 => real,
            Decision::Forward => {
                // SAFETY: `answer` is the trampoline's writable stack slot.
                unsafe { *answer = std::ptr::null_mut() };
                0
            }
            Decision::Answer(p) => {
                // SAFETY: as above.
                unsafe { *answer = p };
                0
            }
        }
    })
}

enum Decision {
    Forward,
    Answer(*mut c_void),
}

/// # Safety
/// `symbol` must be null or a C string.
unsafe fn decide(handle: *mut c_void, symbol: *const c_char) -> Decision {
    if symbol.is_null() || handle == libc::RTLD_NEXT {
        return Decision::Forward;
    }
    // Cheap prefix test before measuring the string: only `cu*` and `nvml*` can be ours.
    // SAFETY: a C string has at least its NUL; we stop at the first byte that differs.
    let (b0, b1) = unsafe {
        (
            *symbol as u8,
            if *symbol == 0 {
                0
            } else {
                *symbol.add(1) as u8
            },
        )
    };
    if !((b0 == b'c' && b1 == b'u') || (b0 == b'n' && b1 == b'v')) {
        return Decision::Forward;
    }
    // SAFETY: non-null C string.
    let name = unsafe { CStr::from_ptr(symbol) };
    let Some(row) = hooked_index(name.to_bytes()) else {
        return Decision::Forward;
    };
    let found = real_dlsym(handle, name) as usize;
    if found == 0 {
        return Decision::Answer(std::ptr::null_mut()); // dlerror is set by the real lookup
    }
    let hook = hook_address(row);
    let driver = real::resolve(row);
    let answer = if found == hook {
        if driver != 0 { hook } else { 0 }
    } else if found == driver {
        hook
    } else {
        found
    };
    Decision::Answer(answer as *mut c_void)
}

/// The exported `dlsym` (see the module docs).
///
/// # Safety
/// Same contract as glibc's `dlsym`.
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    // Entry: rsp ≡ 8 (mod 16). Two pushes + 24 bytes keep the call aligned and give a slot for
    // the answer at [rsp]. After the call, restore the arguments and either jump to glibc's
    // dlsym (return address untouched: the caller's) or return the answer.
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        "sub rsp, 24",
        "mov rdx, rsp",
        "call {route}",
        "mov rcx, qword ptr [rsp]",
        "add rsp, 24",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        "2:",
        "mov rax, rcx",
        "ret",
        route = sym route,
    )
}

/// The exported `dlsym` on architectures without the trampoline: forwards from this frame.
///
/// # Safety
/// Same contract as glibc's `dlsym`.
#[cfg(not(target_arch = "x86_64"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    let mut answer = std::ptr::null_mut();
    let real = route(handle, symbol, &mut answer);
    if real == 0 {
        return answer;
    }
    // SAFETY: `real` is glibc's dlsym; the caller's arguments are forwarded.
    unsafe { std::mem::transmute::<usize, real::DlsymFn>(real)(handle, symbol) }
}
