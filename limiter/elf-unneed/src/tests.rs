//! The edit on a small synthetic shared object shaped like the zig build's: the same sections,
//! the same `DT_NEEDED` list and version needs (the real library is checked by
//! `limiter/build-portable.sh --check` and loaded by the limiter's tests).

use super::*;

/// One import or export of the synthetic object: name, version index, defined.
type Sym = (&'static str, u16, bool);

struct Spec {
    machine: u16,
    needed: Vec<&'static str>,
    /// (file, [(version, index)])
    verneed: Vec<(&'static str, Vec<(&'static str, u16)>)>,
    syms: Vec<Sym>,
}

fn spec() -> Spec {
    Spec {
        machine: EM_X86_64,
        needed: vec![
            "libc.so.6",
            "ld-linux-x86-64.so.2",
            "libpthread.so.0",
            "libdl.so.2",
        ],
        verneed: vec![
            ("libc.so.6", vec![("GLIBC_2.2.5", 2)]),
            (
                "libpthread.so.0",
                vec![("GLIBC_2.2.5", 3), ("GLIBC_2.12", 4)],
            ),
            ("libdl.so.2", vec![("GLIBC_2.2.5", 5)]),
        ],
        syms: vec![
            ("malloc", 2, false),
            ("pthread_create", 3, false),
            ("pthread_setname_np", 4, false),
            ("dlopen", 5, false),
            ("dlsym", 1, true),
        ],
    }
}

struct Layout {
    dynstr: u64,
    dynamic: u64,
    dynamic_len: u64,
    dynsym: u64,
    verneed: u64,
}

fn build(s: &Spec) -> (Vec<u8>, Layout) {
    let mut strtab = vec![0u8];
    let mut strings = std::collections::HashMap::new();
    let mut intern = |t: &str| -> u32 {
        *strings.entry(t.to_owned()).or_insert_with(|| {
            let o = strtab.len() as u32;
            strtab.extend_from_slice(t.as_bytes());
            strtab.push(0);
            o
        })
    };
    let needed: Vec<u32> = s.needed.iter().map(|n| intern(n)).collect();
    let mut verneed = Vec::new();
    for (i, (file, vers)) in s.verneed.iter().enumerate() {
        let last = i + 1 == s.verneed.len();
        verneed.extend_from_slice(&1u16.to_le_bytes());
        verneed.extend_from_slice(&(vers.len() as u16).to_le_bytes());
        verneed.extend_from_slice(&intern(file).to_le_bytes());
        verneed.extend_from_slice(&16u32.to_le_bytes());
        let next = if last { 0 } else { 16 + 16 * vers.len() as u32 };
        verneed.extend_from_slice(&next.to_le_bytes());
        for (j, (v, other)) in vers.iter().enumerate() {
            verneed.extend_from_slice(&0x0d69_6911u32.to_le_bytes()); // vna_hash: not checked
            verneed.extend_from_slice(&0u16.to_le_bytes());
            verneed.extend_from_slice(&other.to_le_bytes());
            verneed.extend_from_slice(&intern(v).to_le_bytes());
            let next: u32 = if j + 1 == vers.len() { 0 } else { 16 };
            verneed.extend_from_slice(&next.to_le_bytes());
        }
    }
    let mut dynsym = vec![0u8; 24];
    let mut versym = vec![0u8; 2];
    for &(name, ver, defined) in &s.syms {
        let mut e = [0u8; 24];
        e[..4].copy_from_slice(&intern(name).to_le_bytes());
        e[4] = (STB_GLOBAL << 4) | 2; // STT_FUNC
        if defined {
            e[6..8].copy_from_slice(&7u16.to_le_bytes());
            e[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        dynsym.extend_from_slice(&e);
        versym.extend_from_slice(&ver.to_le_bytes());
    }
    while !strtab.len().is_multiple_of(8) {
        strtab.push(0);
    }
    while !verneed.len().is_multiple_of(8) {
        verneed.push(0);
    }
    while !versym.len().is_multiple_of(8) {
        versym.push(0);
    }
    let versym_len = 2 * (s.syms.len() as u64 + 1);

    // header 64, one program header 56 -> data from 120 (rounded to 128)
    let dynstr_off = 128u64;
    let dynsym_off = dynstr_off + strtab.len() as u64;
    let versym_off = dynsym_off + dynsym.len() as u64;
    let verneed_off = versym_off + versym.len() as u64;
    let dynamic_off = verneed_off + verneed.len() as u64;
    let mut dynamic: Vec<(u64, u64)> = Vec::new();
    // DT_NEEDED entries interleaved with another entry, to check the order is kept.
    for (i, n) in needed.iter().enumerate() {
        dynamic.push((DT_NEEDED, u64::from(*n)));
        if i == 1 {
            dynamic.push((0x1e, 0x8)); // DT_FLAGS BIND_NOW
        }
    }
    dynamic.extend([
        (DT_STRTAB, dynstr_off),
        (DT_STRSZ, strtab.len() as u64),
        (DT_SYMTAB, dynsym_off),
        (DT_VERSYM, versym_off),
        (DT_VERNEED, verneed_off),
        (DT_VERNEEDNUM, s.verneed.len() as u64),
        (DT_NULL, 0),
        (DT_NULL, 0),
    ]);
    let dynamic_len = dynamic.len() as u64 * 16;
    let shoff = dynamic_off + dynamic_len;

    let mut f = vec![0u8; 128];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4..7].copy_from_slice(&[2, 1, 1]);
    f[16..18].copy_from_slice(&ET_DYN.to_le_bytes());
    f[18..20].copy_from_slice(&s.machine.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    f[0x3c..0x3e].copy_from_slice(&6u16.to_le_bytes());
    // PT_DYNAMIC
    f[64..68].copy_from_slice(&PT_DYNAMIC.to_le_bytes());
    f[72..80].copy_from_slice(&dynamic_off.to_le_bytes());
    f[96..104].copy_from_slice(&dynamic_len.to_le_bytes());
    f.extend_from_slice(&strtab);
    f.extend_from_slice(&dynsym);
    f.extend_from_slice(&versym);
    f.extend_from_slice(&verneed);
    for (t, v) in &dynamic {
        f.extend_from_slice(&t.to_le_bytes());
        f.extend_from_slice(&v.to_le_bytes());
    }
    let mut shdr = |kind: u32, off: u64, size: u64, link: u32, entsize: u64| {
        let mut h = [0u8; 64];
        h[4..8].copy_from_slice(&kind.to_le_bytes());
        h[16..24].copy_from_slice(&off.to_le_bytes()); // sh_addr = offset
        h[24..32].copy_from_slice(&off.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        h[40..44].copy_from_slice(&link.to_le_bytes());
        h[56..64].copy_from_slice(&entsize.to_le_bytes());
        f.extend_from_slice(&h);
    };
    shdr(0, 0, 0, 0, 0);
    shdr(SHT_STRTAB, dynstr_off, strtab.len() as u64, 0, 0);
    shdr(SHT_DYNSYM, dynsym_off, dynsym.len() as u64, 1, 24);
    shdr(SHT_GNU_VERSYM, versym_off, versym_len, 2, 2);
    shdr(SHT_GNU_VERNEED, verneed_off, verneed.len() as u64, 1, 0);
    shdr(SHT_DYNAMIC, dynamic_off, dynamic_len, 1, 16);
    let layout = Layout {
        dynstr: dynstr_off,
        dynamic: dynamic_off,
        dynamic_len,
        dynsym: dynsym_off,
        verneed: verneed_off,
    };
    (f, layout)
}

fn cstr(f: &[u8], at: u64) -> String {
    let s = &f[at as usize..];
    String::from_utf8(s[..s.iter().position(|&c| c == 0).expect("NUL")].to_vec()).expect("utf-8")
}

fn dynamic_entries(f: &[u8], l: &Layout) -> Vec<(u64, u64)> {
    (0..l.dynamic_len / 16)
        .map(|i| {
            let o = l.dynamic + i * 16;
            (u64_at(f, o).expect("tag"), u64_at(f, o + 8).expect("value"))
        })
        .collect()
}

/// (file, [(version, flags)]) of every version need.
fn verneeds(f: &[u8], l: &Layout, n: usize) -> Vec<(String, Vec<(String, u16)>)> {
    let mut at = l.verneed;
    let mut out = Vec::new();
    for _ in 0..n {
        let cnt = u16_at(f, at + 2).expect("cnt");
        let file = cstr(f, l.dynstr + u64::from(u32_at(f, at + 4).expect("file")));
        let mut a = at + u64::from(u32_at(f, at + 8).expect("aux"));
        let mut vers = Vec::new();
        for _ in 0..cnt {
            let name = cstr(f, l.dynstr + u64::from(u32_at(f, a + 8).expect("name")));
            vers.push((name, u16_at(f, a + 4).expect("flags")));
            a += u64::from(u32_at(f, a + 12).expect("next"));
        }
        out.push((file, vers));
        at += u64::from(u32_at(f, at + 12).expect("next"));
    }
    out
}

fn binding(f: &[u8], l: &Layout, index: u64) -> u8 {
    f[(l.dynsym + index * 24 + 4) as usize] >> 4
}

#[test]
fn drops_the_two_needed_entries_and_binds_their_imports_weakly_from_libc() {
    let (mut f, l) = build(&spec());
    let before = dynamic_entries(&f, &l);
    let report = unneed(&mut f).expect("edit");
    assert_eq!(report.removed_needed, ["libpthread.so.0", "libdl.so.2"]);
    assert_eq!(report.retargeted, ["libpthread.so.0", "libdl.so.2"]);
    assert_eq!(
        report.weakened,
        [
            "pthread_create@GLIBC_2.2.5",
            "pthread_setname_np@GLIBC_2.12",
            "dlopen@GLIBC_2.2.5"
        ]
    );

    // .dynamic: the same entries minus the two, in the same order, then DT_NULL to the end.
    let after = dynamic_entries(&f, &l);
    let names = |e: &[(u64, u64)]| -> Vec<String> {
        e.iter()
            .filter(|e| e.0 == DT_NEEDED)
            .map(|e| cstr(&f, l.dynstr + e.1))
            .collect()
    };
    assert_eq!(names(&after), ["libc.so.6", "ld-linux-x86-64.so.2"]);
    let expected: Vec<(u64, u64)> = before
        .iter()
        .copied()
        .filter(|e| {
            !(e.0 == DT_NEEDED
                && ["libpthread.so.0", "libdl.so.2"].contains(&cstr(&f, l.dynstr + e.1).as_str()))
        })
        .collect();
    assert_eq!(after[..expected.len()], expected[..]);
    assert!(after[expected.len()..].iter().all(|&e| e == (DT_NULL, 0)));
    assert_eq!(after.len(), before.len(), "the section keeps its size");

    // Version needs: all name libc.so.6; only the moved versions are weak.
    let vn = verneeds(&f, &l, 3);
    assert!(vn.iter().all(|(file, _)| file == "libc.so.6"), "{vn:?}");
    assert_eq!(vn[0].1, [("GLIBC_2.2.5".to_owned(), 0)]);
    assert_eq!(
        vn[1].1,
        [
            ("GLIBC_2.2.5".to_owned(), VER_FLG_WEAK),
            ("GLIBC_2.12".to_owned(), VER_FLG_WEAK)
        ]
    );
    assert_eq!(vn[2].1, [("GLIBC_2.2.5".to_owned(), VER_FLG_WEAK)]);

    // Symbols 1..=5: malloc stays global, the three moved imports are weak, dlsym (ours) global.
    let binds: Vec<u8> = (1..=5).map(|i| binding(&f, &l, i)).collect();
    assert_eq!(
        binds,
        [STB_GLOBAL, STB_WEAK, STB_WEAK, STB_WEAK, STB_GLOBAL]
    );
    assert_eq!(f[(l.dynsym + 2 * 24 + 4) as usize] & 0xf, 2, "type kept");

    // Idempotent: a second run changes nothing.
    let edited = f.clone();
    assert!(unneed(&mut f).expect("second edit").is_noop());
    assert_eq!(f, edited);
}

#[test]
fn aarch64_is_edited_too() {
    let mut s = spec();
    s.machine = EM_AARCH64;
    s.needed[1] = "ld-linux-aarch64.so.1";
    let (mut f, _) = build(&s);
    assert_eq!(unneed(&mut f).expect("edit").removed_needed.len(), 2);
}

#[test]
fn anything_unexpected_is_refused() {
    let refused = |s: Spec, why: &str| {
        let (mut f, _) = build(&s);
        let e = unneed(&mut f).expect_err(why);
        assert!(e.0.contains(why), "{why}: got {e}");
    };
    let mut s = spec();
    s.machine = 3; // i386 number in a 64-bit file
    refused(s, "unsupported machine");

    let mut s = spec();
    s.needed.retain(|n| *n != "libc.so.6");
    refused(s, "libc.so.6 is not DT_NEEDED");

    let mut s = spec();
    s.syms.push(("pthread_own", 3, true));
    refused(s, "pthread_own is defined here");

    let mut s = spec();
    s.verneed.pop();
    refused(s, "libdl.so.2 is DT_NEEDED without a version need");

    let mut s = spec();
    s.needed.pop();
    refused(s, "names libdl.so.2, which is not DT_NEEDED");

    let (mut f, _) = build(&spec());
    f[4] = 1; // ELFCLASS32
    assert!(unneed(&mut f).expect_err("32-bit").0.contains("ELF64"));
    let (mut f, _) = build(&spec());
    f.truncate(f.len() - 10);
    assert!(
        unneed(&mut f)
            .expect_err("truncated")
            .0
            .contains("past the end")
    );
}
