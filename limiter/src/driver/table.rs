//! The driver layer's expansion of THE list ([`crate::driver::functions`]):
//!
//! * [`Sym`]: row indices,
//! * [`ENTRIES`]: name, library and `cuGetProcAddress` facts (base name, first CUDA version,
//!   per-thread-default-stream variant) — what `dlsym` and `cuGetProcAddress` consult,
//! * [`SLOTS`]: the lazily resolved real addresses (see [`crate::driver::real`]), and the typed
//!   accessors in [`real`] (`real::cuMemAlloc_v2()` → `Option<fn>`).
//!
//! The exported hooks are the hooks layer's expansion of the same list (`hooks/exports.rs`).

use crate::driver::ffi::*;
use crate::driver::functions::driver_functions;
use crate::driver::real::{self as resolution, Lib, MISSING, NOT_YET};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

/// One row of the list.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Exported / resolved symbol name.
    pub(crate) name: &'static CStr,
    pub(crate) lib: Lib,
    /// `true` for rows we export; `false` for functions we only call.
    pub(crate) hooked: bool,
    /// The name `cuGetProcAddress` callers ask for (no `_v2`/`_ptsz` suffix); empty for NVML
    /// and internal rows.
    pub(crate) base: &'static str,
    /// The first `cudaVersion` (1000 × major + 10 × minor) for which `cuGetProcAddress(base)`
    /// returns this ABI.
    pub(crate) since: c_int,
    /// A per-thread-default-stream (`_ptsz`/`_ptds`) variant.
    pub(crate) per_thread: bool,
}

const fn cstr(bytes: &'static [u8]) -> &'static CStr {
    match CStr::from_bytes_with_nul(bytes) {
        Ok(c) => c,
        Err(_) => panic!("symbol name with an interior NUL"),
    }
}

macro_rules! slots {
    (
        intercepted {
            $( $lib:ident fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) -> $ret:ty
                [$base:literal, $since:literal, $pt:literal]; )*
        }
        launches {
            $( $llib:ident fn $lname:ident ( $($larg:ident : $lty:ty),* $(,)? ) -> $lret:ty
                [$lbase:literal, $lsince:literal, $lpt:literal]; )*
        }
        called {
            $( $ilib:ident fn $iname:ident ( $($ity:ty),* $(,)? ) -> $iret:ty; )*
        }
    ) => {
        /// Row indices.
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Debug, Clone, Copy)]
        #[repr(usize)]
        pub(crate) enum Sym { $($name,)* $($lname,)* $($iname,)* }

        pub(crate) static ENTRIES: &[Entry] = &[
            $( Entry {
                name: cstr(concat!(stringify!($name), "\0").as_bytes()),
                lib: Lib::$lib,
                hooked: true,
                base: $base,
                since: $since,
                per_thread: $pt,
            }, )*
            $( Entry {
                name: cstr(concat!(stringify!($lname), "\0").as_bytes()),
                lib: Lib::$llib,
                hooked: true,
                base: $lbase,
                since: $lsince,
                per_thread: $lpt,
            }, )*
            $( Entry {
                name: cstr(concat!(stringify!($iname), "\0").as_bytes()),
                lib: Lib::$ilib,
                hooked: false,
                base: "",
                since: 0,
                per_thread: false,
            }, )*
        ];

        const COUNT: usize =
            [$(stringify!($name),)* $(stringify!($lname),)* $(stringify!($iname),)*].len();

        /// Real addresses: 0 = not resolved yet, 1 = missing, else the address.
        pub(crate) static SLOTS: [AtomicUsize; COUNT] = [const { AtomicUsize::new(0) }; COUNT];

        /// Typed access to the real functions (resolved on first use; `None` when missing).
        #[allow(non_snake_case, dead_code)]
        pub(crate) mod real {
            use super::*;
            $(
                #[inline]
                pub(crate) fn $name() -> Option<unsafe extern "C" fn($($ty),*) -> $ret> {
                    let addr = resolve(Sym::$name as usize);
                    // SAFETY: a non-zero address was returned by dlsym for exactly this name,
                    // whose C prototype is the one declared in the list's row.
                    (addr != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) -> $ret>(addr)
                    })
                }
            )*
            $(
                #[inline]
                pub(crate) fn $lname() -> Option<unsafe extern "C" fn($($lty),*) -> $lret> {
                    let addr = resolve(Sym::$lname as usize);
                    // SAFETY: as above — dlsym's address for this name and declared prototype.
                    (addr != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($lty),*) -> $lret>(addr)
                    })
                }
            )*
            /// The launch rows' real functions if already resolved (one atomic load, never resolving:
            /// the launch exports' fast path, which must not do more than load atomics).
            pub(crate) mod ready {
                use super::*;
                $(
                    #[inline(always)]
                    pub(crate) fn $lname() -> Option<unsafe extern "C" fn($($lty),*) -> $lret> {
                        let addr = SLOTS[Sym::$lname as usize].load(Ordering::Acquire);
                        // SAFETY: an address above `MISSING` was stored by `resolve_slow` from
                        // dlsym for exactly this name, whose C prototype is the row's.
                        (addr > MISSING).then(|| unsafe {
                            std::mem::transmute::<usize, unsafe extern "C" fn($($lty),*) -> $lret>(addr)
                        })
                    }
                )*
            }
            $(
                #[inline]
                pub(crate) fn $iname() -> Option<unsafe extern "C" fn($($ity),*) -> $iret> {
                    let addr = resolve(Sym::$iname as usize);
                    // SAFETY: as above — dlsym's address for this name and declared prototype.
                    (addr != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($ity),*) -> $iret>(addr)
                    })
                }
            )*
        }
    };
}

driver_functions!(slots);

/// Resolves slot `idx`; returns 0 when the symbol or its library is missing. After the first call
/// one atomic load.
#[inline]
pub(crate) fn resolve(idx: usize) -> usize {
    match SLOTS[idx].load(Ordering::Acquire) {
        MISSING => 0,
        NOT_YET => resolve_slow(idx),
        addr => addr,
    }
}

#[cold]
fn resolve_slow(idx: usize) -> usize {
    let entry = &ENTRIES[idx];
    let addr = resolution::library(entry.lib)
        .map(|h| resolution::real_dlsym(h, entry.name) as usize)
        .filter(|&a| a > MISSING)
        .unwrap_or(MISSING);
    SLOTS[idx].store(addr, Ordering::Release);
    if addr == MISSING { 0 } else { addr }
}

/// The row exporting `name`, if we intercept it.
pub(crate) fn hooked_index(name: &[u8]) -> Option<usize> {
    ENTRIES
        .iter()
        .position(|e| e.hooked && e.name.to_bytes() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_row() {
        assert_eq!(ENTRIES.len(), SLOTS.len());
        assert_eq!(
            ENTRIES.len(),
            Sym::nvmlDeviceGetUtilizationRates as usize + 1
        );
    }

    #[test]
    fn cuda_rows_carry_proc_address_facts() {
        for e in ENTRIES.iter().filter(|e| e.hooked && e.lib == Lib::Cuda) {
            let name = e.name.to_str().unwrap_or_default();
            assert!(name.starts_with(e.base), "{name} vs {}", e.base);
            assert!(e.since >= 2000, "{name}");
            assert_eq!(e.per_thread, name.ends_with("_ptsz"), "{name}");
        }
    }

    #[test]
    fn lookup_by_name() {
        assert_eq!(
            hooked_index(b"cuMemAlloc_v2"),
            Some(Sym::cuMemAlloc_v2 as usize)
        );
        assert_eq!(
            hooked_index(b"cuCtxGetDevice"),
            None,
            "internal rows are not hooks"
        );
        assert_eq!(hooked_index(b"malloc"), None);
    }
}
