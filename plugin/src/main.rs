//! `vgpu-device-plugin`: the node agent's binary; everything it does is in the library, from [`cli::main`].
//!
//! [`cli::main`]: vgpu_device_plugin::cli::main

fn main() -> std::process::ExitCode {
    vgpu_device_plugin::cli::main()
}
