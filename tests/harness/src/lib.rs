//! In-process fakes of the systems the node agent talks to, for tests, benchmarks and the run command.
//!
//! [`FakeKubelet`] serves the kubelet's `Registration` service on `kubelet.sock` in a directory of the caller's
//! choosing and behaves like the kubelet's device manager where the agent can tell: it checks each
//! `RegisterRequest`, dials the plugin back on the socket named in it, calls `GetDevicePluginOptions` first and
//! then keeps a `ListAndWatch` stream open with the kubelet's 4 MiB receive limit, and on
//! [`FakeKubelet::restart`] deletes every socket in the directory before re-creating its own.

pub mod apiserver;
pub mod kubelet;

pub use apiserver::{FakeApiServer, RecordedRequest};
pub use kubelet::{FakeKubelet, ResourceView};
