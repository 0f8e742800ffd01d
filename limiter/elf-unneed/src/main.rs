//! `elf-unneed FILE`: edits the glibc-2.17 `libvgpu.so` in place so that it no longer needs
//! `libpthread.so.0` and `libdl.so.2` (see the library's docs). Writes a temporary file next to
//! FILE and renames it over FILE, so a failure leaves FILE as it was. Prints what changed; exits
//! non-zero, naming the reason, on anything it does not expect.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file] = args.as_slice() else {
        eprintln!("usage: elf-unneed FILE");
        return ExitCode::from(2);
    };
    match run(file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: elf-unneed {file}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(file: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut bytes = std::fs::read(file)?;
    let report = elf_unneed::unneed(&mut bytes)?;
    if report.is_noop() {
        println!(
            "{file}: needs neither of {:?} (already edited)",
            elf_unneed::DROPPED
        );
        return Ok(());
    }
    let tmp = format!("{file}.unneed-tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::set_permissions(&tmp, std::fs::metadata(file)?.permissions())?;
    std::fs::rename(&tmp, file)?;
    println!(
        "{file}: dropped DT_NEEDED {:?}; their version needs now name {}; weak imports: {}",
        report.removed_needed,
        elf_unneed::INTO,
        report.weakened.join(" ")
    );
    Ok(())
}
