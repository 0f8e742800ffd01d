//! What a container is handed: the environment and mounts that put `libvgpu.so` and its limits into it
//! ([`response`]), the CDI spec the runtime resolves device names against ([`cdi`]), the device nodes
//! ([`device_nodes`]), and where all of it is inside the container ([`paths`]).

pub mod cdi;
pub mod device_nodes;
pub mod paths;
pub mod response;
