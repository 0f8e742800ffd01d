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
//! means — except when the driver lacks the function and the caller is before us (the trampoline
//! passes the caller's return address; the link-map order comes from `dl_iterate_phdr`): then the
//! answer is what comes after us, as without the preload.
//!
//! **`dlerror`.** Whenever we answer NULL, the last thing done is a real, failed glibc lookup of
//! the same name, so glibc itself records the error and `dlerror()` returns a message, as after
//! any failed `dlsym` (CPython's `ctypes` calls `strlen` on it: `hasattr(ctypes.CDLL(None),
//! "cuInit")` crashed when it was NULL). We never write glibc's error state ourselves.
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

use crate::driver::real::{real_dlsym, real_dlsym_addr};
use crate::driver::table::{hooked_index, resolve};
use crate::hooks::exports::hook_address;
use std::ffi::{CStr, c_char, c_void};

/// Decides a `dlsym(handle, symbol)` call made from return address `caller`. Returns the address
/// of glibc's `dlsym` to tail-call with the original arguments, or 0 when the answer has been
/// stored in `*answer`.
extern "C" fn route(
    handle: *mut c_void,
    symbol: *const c_char,
    answer: *mut *mut c_void,
    caller: usize,
) -> usize {
    crate::infra::guard::ffi(0, || {
        let real = real_dlsym_addr();
        // SAFETY: `symbol` is the caller's argument (checked for null) and `answer` points to the
        // trampoline's stack slot.
        match unsafe { decide(handle, symbol, caller) } {
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
unsafe fn decide(handle: *mut c_void, symbol: *const c_char, caller: usize) -> Decision {
    if symbol.is_null() {
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
    if handle == libc::RTLD_NEXT {
        // glibc finds our export for callers loaded before us (that is interposition) and the
        // driver's for callers after us. Only one case differs from "without the preload": a
        // caller before us asking for a function the driver does not have would get our hook
        // (which can only fail); without us it gets whatever comes next, or NULL and an error.
        // (Order: the caller's position first, so a lookup we pass on never opens the driver.)
        if !loaded_before_us(caller) || resolve(row) != 0 {
            return Decision::Forward;
        }
        return Decision::Answer(after_us(name));
    }
    let found = real_dlsym(handle, name) as usize;
    if found == 0 {
        return Decision::Answer(std::ptr::null_mut()); // dlerror is set by the real lookup
    }
    let hook = hook_address(row);
    let driver = resolve(row);
    let answer = if found == hook {
        if driver != 0 {
            hook
        } else {
            // An `RTLD_DEFAULT`/`dlopen(NULL)` probe found our export but the driver (or the
            // whole driver) lacks the function: answer what the lookup would find without us.
            return Decision::Answer(after_us(name));
        }
    } else if found == driver {
        hook
    } else {
        found
    };
    Decision::Answer(answer as *mut c_void)
}

/// The next definition of `name` after this library, looked up by glibc itself as the last thing
/// before we answer: when there is none, glibc's own failed lookup records the error, so
/// `dlerror()` returns a message (`"<object>: undefined symbol: <name>"`) as for any failed
/// `dlsym` — never NULL after a NULL result, which made CPython's `ctypes` call `strlen(NULL)`.
/// (The object named is this library, not the handle's: glibc words the message after the object
/// whose scope it searched.)
fn after_us(name: &CStr) -> *mut c_void {
    real_dlsym(libc::RTLD_NEXT, name)
}

/// Whether the object containing code address `caller` comes before this library in the link
/// map (load) order, which is the order glibc's `RTLD_NEXT` search follows. Unknown callers count
/// as "before" (the preload is loaded right after the program, so nearly everything is after).
fn loaded_before_us(caller: usize) -> bool {
    struct Search {
        caller: usize,
        ours: usize,
        index: usize,
        caller_at: Option<usize>,
        ours_at: Option<usize>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> libc::c_int {
        // SAFETY: glibc passes a valid `dl_phdr_info` and our `data` (a `Search`).
        let (info, search) = unsafe { (&*info, &mut *data.cast::<Search>()) };
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: glibc describes `dlpi_phnum` program headers at `dlpi_phdr`.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let contains = |addr: usize| {
            phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD).any(|p| {
                let start = (info.dlpi_addr as usize).wrapping_add(p.p_vaddr as usize);
                addr >= start && addr - start < p.p_memsz as usize
            })
        };
        if search.caller_at.is_none() && contains(search.caller) {
            search.caller_at = Some(search.index);
        }
        if search.ours_at.is_none() && contains(search.ours) {
            search.ours_at = Some(search.index);
        }
        search.index += 1;
        libc::c_int::from(search.caller_at.is_some() && search.ours_at.is_some())
    }
    let mut search = Search {
        caller,
        ours: route as *const () as usize,
        index: 0,
        caller_at: None,
        ours_at: None,
    };
    // SAFETY: `visit` matches the callback type and only reads what glibc hands it.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut search).cast()) };
    match (search.caller_at, search.ours_at) {
        (Some(c), Some(o)) => c < o,
        _ => true,
    }
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
    // the answer at [rsp]; the caller's return address (40 bytes up) is the fourth argument, for
    // `RTLD_NEXT`. After the call, restore the arguments and either jump to glibc's
    // dlsym (return address untouched: the caller's) or return the answer.
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        "sub rsp, 24",
        "mov rdx, rsp",
        "mov rcx, qword ptr [rsp + 40]",
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
    // No caller address here: `RTLD_NEXT` is relative to this library anyway (see the docs).
    let real = route(handle, symbol, &mut answer, 0);
    if real == 0 {
        return answer;
    }
    // SAFETY: `real` is glibc's dlsym; the caller's arguments are forwarded.
    unsafe { std::mem::transmute::<usize, crate::driver::real::DlsymFn>(real)(handle, symbol) }
}
