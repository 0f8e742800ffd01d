//! The post-link edit of the glibc-2.17 `libvgpu.so` (run by `limiter/build-portable.sh` and
//! `docker/build-artifacts.sh` right after the zig build): it stops needing `libpthread.so.0` and
//! `libdl.so.2`.
//!
//! # Why
//!
//! Built against glibc 2.17, the library imports `pthread_create`, `sem_init`, `dlopen`, … from
//! `libpthread.so.0` and `libdl.so.2`, where glibc < 2.34 keeps them. The library is in
//! `/etc/ld.so.preload` of GPU containers, so every process start pays for finding, mapping and
//! relocating those two files (about 40 µs together), even on a glibc ≥ 2.34 image where they are
//! empty stubs and `libc.so.6` has every one of those functions at the same old versions.
//!
//! # What the edit does (ELF64, little-endian, x86_64 and aarch64; anything else is an error)
//!
//! * Each `.gnu.version_r` entry whose file is `libpthread.so.0` or `libdl.so.2` is retargeted to
//!   `libc.so.6` (its name is already in `.dynstr`), and its versions are marked `VER_FLG_WEAK`.
//!   glibc's loader looks the file of a version need up among the loaded objects (`libc.so.6`
//!   always is) and, for a weak version it does not find, only warns under `ldd`.
//! * Every undefined `.dynsym` symbol whose `.gnu.version` index is one of those versions becomes
//!   `STB_WEAK`. Symbol lookup matches the version's name and hash, never its file, so
//!   `pthread_create@GLIBC_2.2.5` binds to `libc.so.6`'s definition on glibc ≥ 2.34, to
//!   `libpthread.so.0`'s on an older glibc when the process loaded it at start, and to NULL
//!   otherwise (a weak undefined symbol; with `BIND_NOW`, it stays NULL). The library checks those
//!   addresses before calling them (`limiter/src/infra/imports.rs`).
//! * The two `DT_NEEDED` entries leave `.dynamic`; the array is compacted (its entries are
//!   position independent) and padded with `DT_NULL`.
//!
//! Nothing moves and no size changes, so no other offset or address needs fixing. The edit is
//! idempotent: an edited file is reported as such and left alone.

use std::collections::BTreeSet;
use std::fmt;

/// The libraries whose `DT_NEEDED` entries are dropped.
pub const DROPPED: [&str; 2] = ["libpthread.so.0", "libdl.so.2"];
/// The library their version needs are retargeted to.
pub const INTO: &str = "libc.so.6";

const SHT_STRTAB: u32 = 3;
const SHT_DYNAMIC: u32 = 6;
const SHT_DYNSYM: u32 = 11;
const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
const SHT_GNU_VERSYM: u32 = 0x6fff_ffff;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_STRSZ: u64 = 10;
const DT_VERSYM: u64 = 0x6fff_fff0;
const DT_VERNEED: u64 = 0x6fff_fffe;
const DT_VERNEEDNUM: u64 = 0x6fff_ffff;
const VER_FLG_WEAK: u16 = 0x2;
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const ET_DYN: u16 = 3;

/// Why a file could not be edited: it is not what the build produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

macro_rules! bail {
    ($($t:tt)*) => { return Err(Error(format!($($t)*))) };
}

/// What the edit changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// `DT_NEEDED` entries removed.
    pub removed_needed: Vec<String>,
    /// Version needs retargeted to [`INTO`] (their old file names).
    pub retargeted: Vec<String>,
    /// Imports made weak, `name@version`.
    pub weakened: Vec<String>,
}

impl Report {
    /// The file was already edited (or never needed the two libraries).
    pub fn is_noop(&self) -> bool {
        self.removed_needed.is_empty() && self.retargeted.is_empty() && self.weakened.is_empty()
    }
}

fn slice(b: &[u8], off: u64, len: u64) -> Result<&[u8], Error> {
    let (Ok(o), Ok(l)) = (usize::try_from(off), usize::try_from(len)) else {
        bail!("offset {off:#x}+{len:#x} out of range");
    };
    match o.checked_add(l).and_then(|end| b.get(o..end)) {
        Some(s) => Ok(s),
        None => bail!(
            "offset {off:#x}+{len:#x} past the end of the file ({:#x})",
            b.len()
        ),
    }
}

fn u16_at(b: &[u8], off: u64) -> Result<u16, Error> {
    let s = slice(b, off, 2)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: u64) -> Result<u32, Error> {
    let s = slice(b, off, 4)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: u64) -> Result<u64, Error> {
    let s = slice(b, off, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn put(b: &mut [u8], off: u64, bytes: &[u8]) -> Result<(), Error> {
    slice(b, off, bytes.len() as u64)?;
    // In range: checked just above.
    let o = off as usize;
    b[o..o + bytes.len()].copy_from_slice(bytes);
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Section {
    kind: u32,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    entsize: u64,
}

fn sections(b: &[u8]) -> Result<Vec<Section>, Error> {
    if slice(b, 0, 4)? != b"\x7fELF" {
        bail!("not an ELF file");
    }
    let ident = slice(b, 4, 3)?;
    if ident != [2, 1, 1] {
        bail!("not a little-endian ELF64 version-1 file (class/data/version {ident:?})");
    }
    let (kind, machine) = (u16_at(b, 16)?, u16_at(b, 18)?);
    if kind != ET_DYN {
        bail!("not a shared object (e_type {kind})");
    }
    if machine != EM_X86_64 && machine != EM_AARCH64 {
        bail!("unsupported machine {machine} (x86_64 and aarch64 only)");
    }
    let (shoff, shentsize, shnum) = (u64_at(b, 0x28)?, u16_at(b, 0x3a)?, u16_at(b, 0x3c)?);
    if shentsize != 64 || shnum == 0 {
        bail!("no usable section headers (e_shentsize {shentsize}, e_shnum {shnum})");
    }
    (0..u64::from(shnum))
        .map(|i| {
            let h = shoff + i * 64;
            Ok(Section {
                kind: u32_at(b, h + 4)?,
                addr: u64_at(b, h + 16)?,
                offset: u64_at(b, h + 24)?,
                size: u64_at(b, h + 32)?,
                link: u32_at(b, h + 40)?,
                entsize: u64_at(b, h + 56)?,
            })
        })
        .collect()
}

fn only(secs: &[Section], kind: u32, what: &str) -> Result<Section, Error> {
    let mut it = secs.iter().filter(|s| s.kind == kind);
    match (it.next(), it.next()) {
        (Some(s), None) => Ok(*s),
        (None, _) => bail!("no {what} section"),
        (Some(_), Some(_)) => bail!("more than one {what} section"),
    }
}

/// The NUL-terminated string at `off` of the string table.
fn string(b: &[u8], strtab: Section, off: u64) -> Result<String, Error> {
    if off >= strtab.size {
        bail!(
            "string offset {off:#x} outside .dynstr ({:#x} bytes)",
            strtab.size
        );
    }
    let s = slice(b, strtab.offset + off, strtab.size - off)?;
    let Some(end) = s.iter().position(|&c| c == 0) else {
        bail!("unterminated string at .dynstr+{off:#x}");
    };
    match std::str::from_utf8(&s[..end]) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => bail!("non-UTF-8 string at .dynstr+{off:#x}"),
    }
}

/// Edits `elf` (the whole file) in place; see the crate docs. On error nothing is guaranteed
/// about `elf`'s contents: edit a copy and write it only on success.
pub fn unneed(elf: &mut [u8]) -> Result<Report, Error> {
    let secs = sections(elf)?;
    let dynamic = only(&secs, SHT_DYNAMIC, ".dynamic")?;
    let dynsym = only(&secs, SHT_DYNSYM, ".dynsym")?;
    let versym = only(&secs, SHT_GNU_VERSYM, ".gnu.version")?;
    let verneed = only(&secs, SHT_GNU_VERNEED, ".gnu.version_r")?;
    let Some(&dynstr) = secs.get(dynsym.link as usize) else {
        bail!(".dynsym links to no section");
    };
    if dynstr.kind != SHT_STRTAB
        || dynamic.link != dynsym.link
        || verneed.link != dynsym.link
        || dynamic.entsize != 16
        || dynsym.entsize != 24
    {
        bail!("unexpected .dynamic/.dynsym/.dynstr/.gnu.version_r layout");
    }
    // The loader reads PT_DYNAMIC, not the section: they must be the same bytes.
    let (phoff, phentsize, phnum) = (u64_at(elf, 0x20)?, u16_at(elf, 0x36)?, u16_at(elf, 0x38)?);
    if phentsize != 56 {
        bail!("unexpected e_phentsize {phentsize}");
    }
    let mut pt_dynamic = None;
    for i in 0..u64::from(phnum) {
        let h = phoff + i * 56;
        if u32_at(elf, h)? == PT_DYNAMIC {
            pt_dynamic = Some((u64_at(elf, h + 8)?, u64_at(elf, h + 32)?));
        }
    }
    if pt_dynamic != Some((dynamic.offset, dynamic.size)) {
        bail!("PT_DYNAMIC {pt_dynamic:?} is not the .dynamic section");
    }

    // .dynamic: entries up to DT_NULL, cross-checked against the sections.
    let mut entries = Vec::new();
    for i in 0..dynamic.size / 16 {
        let (tag, val) = (
            u64_at(elf, dynamic.offset + i * 16)?,
            u64_at(elf, dynamic.offset + i * 16 + 8)?,
        );
        if tag == DT_NULL {
            break;
        }
        entries.push((tag, val));
    }
    if entries.len() as u64 == dynamic.size / 16 {
        bail!(".dynamic has no DT_NULL terminator");
    }
    let tag = |t: u64| entries.iter().find(|e| e.0 == t).map(|e| e.1);
    for (t, name, want) in [
        (DT_STRTAB, "DT_STRTAB", dynstr.addr),
        (DT_STRSZ, "DT_STRSZ", dynstr.size),
        (DT_SYMTAB, "DT_SYMTAB", dynsym.addr),
        (DT_VERSYM, "DT_VERSYM", versym.addr),
        (DT_VERNEED, "DT_VERNEED", verneed.addr),
    ] {
        if tag(t) != Some(want) {
            bail!("{name} is {:?}, the section says {want:#x}", tag(t));
        }
    }
    let Some(verneednum) = tag(DT_VERNEEDNUM) else {
        bail!("no DT_VERNEEDNUM");
    };

    let mut needed = Vec::new();
    for &(t, v) in &entries {
        if t == DT_NEEDED {
            needed.push((string(elf, dynstr, v)?, v));
        }
    }
    let Some(&(_, into_off)) = needed.iter().find(|(n, _)| n == INTO) else {
        bail!("{INTO} is not DT_NEEDED");
    };
    let into_off = match u32::try_from(into_off) {
        Ok(o) => o,
        Err(_) => bail!("{INTO}'s .dynstr offset does not fit vn_file"),
    };

    // .gnu.version_r: retarget the dropped libraries' needs.
    let mut report = Report::default();
    let mut moved = BTreeSet::new();
    let mut versions = std::collections::BTreeMap::new();
    let mut at = verneed.offset;
    for i in 0..verneednum {
        if at + 16 > verneed.offset + verneed.size {
            bail!("version need {i} outside .gnu.version_r");
        }
        let (version, cnt) = (u16_at(elf, at)?, u16_at(elf, at + 2)?);
        let (file, aux, next) = (
            u32_at(elf, at + 4)?,
            u32_at(elf, at + 8)?,
            u32_at(elf, at + 12)?,
        );
        if version != 1 {
            bail!("version need {i} has vn_version {version}");
        }
        let file_name = string(elf, dynstr, u64::from(file))?;
        let dropped = DROPPED.contains(&file_name.as_str());
        let mut a = at + u64::from(aux);
        for j in 0..cnt {
            let (flags, other, name) = (
                u16_at(elf, a + 4)?,
                u16_at(elf, a + 6)?,
                u32_at(elf, a + 8)?,
            );
            let vname = string(elf, dynstr, u64::from(name))?;
            if dropped {
                put(elf, a + 4, &(flags | VER_FLG_WEAK).to_le_bytes())?;
                moved.insert(other);
            }
            versions.insert(other, vname);
            let vna_next = u32_at(elf, a + 12)?;
            if vna_next == 0 && j + 1 != cnt {
                bail!(
                    "version need {file_name}: {cnt} versions announced, {} found",
                    j + 1
                );
            }
            a += u64::from(vna_next);
        }
        if dropped {
            if !needed.iter().any(|(n, _)| *n == file_name) {
                bail!("a version need names {file_name}, which is not DT_NEEDED");
            }
            put(elf, at + 4, &into_off.to_le_bytes())?;
            report.retargeted.push(file_name);
        }
        if next == 0 {
            if i + 1 != verneednum {
                bail!("DT_VERNEEDNUM is {verneednum}, the chain ends at {}", i + 1);
            }
            break;
        }
        at += u64::from(next);
    }

    // .dynsym: their imports become weak.
    let count = dynsym.size / 24;
    if versym.size != count * 2 {
        bail!(
            ".gnu.version has {} entries for {count} symbols",
            versym.size / 2
        );
    }
    for i in 1..count {
        let ndx = u16_at(elf, versym.offset + i * 2)? & 0x7fff;
        if !moved.contains(&ndx) {
            continue;
        }
        let s = dynsym.offset + i * 24;
        let (name, info, shndx) = (
            u32_at(elf, s)?,
            slice(elf, s + 4, 1)?[0],
            u16_at(elf, s + 6)?,
        );
        let name = string(elf, dynstr, u64::from(name))?;
        if shndx != 0 {
            bail!("{name} is defined here but carries a needed version ({ndx})");
        }
        match info >> 4 {
            STB_GLOBAL | STB_WEAK => {}
            b => bail!("{name} has binding {b}"),
        }
        put(elf, s + 4, &[(STB_WEAK << 4) | (info & 0xf)])?;
        let v = versions.get(&ndx).map_or("?", String::as_str);
        report.weakened.push(format!("{name}@{v}"));
    }

    // .dynamic: drop the DT_NEEDED entries, keep the order of the rest, pad with DT_NULL.
    let is_dropped = |&(t, v): &(u64, u64)| {
        t == DT_NEEDED
            && needed
                .iter()
                .any(|(n, off)| *off == v && DROPPED.contains(&n.as_str()))
    };
    let dropped_needed: Vec<String> = needed
        .iter()
        .filter(|(n, _)| DROPPED.contains(&n.as_str()))
        .map(|(n, _)| n.clone())
        .collect();
    for n in &dropped_needed {
        if !report.retargeted.contains(n) {
            bail!("{n} is DT_NEEDED without a version need: its imports cannot be told apart");
        }
    }
    let kept: Vec<(u64, u64)> = entries.iter().copied().filter(|e| !is_dropped(e)).collect();
    for i in 0..dynamic.size / 16 {
        let (t, v) = kept.get(i as usize).copied().unwrap_or((DT_NULL, 0));
        put(elf, dynamic.offset + i * 16, &t.to_le_bytes())?;
        put(elf, dynamic.offset + i * 16 + 8, &v.to_le_bytes())?;
    }
    report.removed_needed = dropped_needed;
    Ok(report)
}

#[cfg(test)]
mod tests;
