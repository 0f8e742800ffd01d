//! In-process fakes of the systems the node agent talks to, for tests, benchmarks and the run command.
//!
//! [`FakeKubelet`] serves the kubelet's `Registration` service on `kubelet.sock` in a directory of the caller's
//! choosing and behaves like the kubelet's device manager where the agent can tell: it checks each
//! `RegisterRequest`, dials the plugin back on the socket named in it, calls `GetDevicePluginOptions` first and
//! then keeps a `ListAndWatch` stream open with the kubelet's 4 MiB receive limit, and on
//! [`FakeKubelet::restart`] deletes every socket in the directory before re-creating its own.
//! [`FakeApiServer`] is a kube-apiserver on loopback reached through a kubeconfig. [`cluster`] puts both
//! and the real agent binary on a gpu-sim node: the one fixture of the agent's end-to-end tests.

pub mod apiserver;
pub mod cluster;
pub mod kubelet;

pub use apiserver::{FakeApiServer, RecordedRequest};
pub use kubelet::{FakeKubelet, ResourceView};
