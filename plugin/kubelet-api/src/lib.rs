//! The kubelet device-plugin API, v1beta1: the two gRPC services (`Registration`, served by the kubelet, and
//! `DevicePlugin`, served by plugins), their messages, and the constants of upstream `constants.go`.
//!
//! The module in `generated/` is produced from the vendored `proto/v1beta1/api.proto` (upstream commit in
//! `proto/UPSTREAM.md`) and committed; `tests/generated_code.rs` fails when the two disagree. Nothing here
//! needs `protoc` at build time.

/// Generated messages, clients and servers of package `v1beta1`.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    rust_2018_idioms
)]
pub mod v1beta1 {
    include!("generated/v1beta1.rs");

    /// `Device.health` of a device that may be allocated.
    pub const HEALTHY: &str = "Healthy";
    /// `Device.health` of a device that must not be allocated.
    pub const UNHEALTHY: &str = "Unhealthy";
    /// The API version sent in `RegisterRequest.version`.
    pub const VERSION: &str = "v1beta1";
    /// The directory the kubelet watches for plugin sockets (with the trailing slash, as upstream).
    pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins/";
    /// The kubelet's Registration socket.
    pub const KUBELET_SOCKET: &str = "/var/lib/kubelet/device-plugins/kubelet.sock";
    /// The kubelet's timeout for `PreStartContainer`, in seconds.
    pub const PRE_START_CONTAINER_TIMEOUT_SECS: u64 = 30;
    /// The kubelet reads `ListAndWatch` with gRPC's default receive limit; a larger message is dropped.
    pub const KUBELET_MAX_RECV_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
}
