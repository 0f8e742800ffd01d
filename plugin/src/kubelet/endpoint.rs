//! Serving one resource's `DevicePlugin` service on its socket in the kubelet's directory.
//!
//! Start: remove a stale socket, listen, serve, then dial our own socket and ask for the options, so the
//! kubelet is only told about an endpoint that already answers. Stop: end the open `ListAndWatch` streams,
//! stop the server and remove the socket file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kubelet_api::v1beta1::device_plugin_client::DevicePluginClient;
use kubelet_api::v1beta1::device_plugin_server::DevicePluginServer;
use kubelet_api::v1beta1::{DevicePluginOptions, Empty};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::ResourceKind;
use crate::kubelet::authority::AnyAuthority;
use crate::kubelet::registration::unix_channel;
use crate::kubelet::service::ResourceService;

/// The socket file name of a resource: the Go plugin's `nvidia-<name after '/'>.sock`, so operators and
/// scripts that look for those names still find them.
pub fn socket_file_name(resource_name: &str) -> String {
    let short = resource_name.rsplit('/').next().unwrap_or(resource_name);
    format!("nvidia-{short}.sock")
}

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Binding the socket failed (permissions, missing directory, path too long).
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer our own call.
    #[error("the endpoint on {path} does not answer its own GetDevicePluginOptions")]
    SelfCheck {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: SelfCheckError,
    },
}

/// Why our own call to a freshly started endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    /// Dialling the socket failed.
    #[error("cannot connect")]
    Connect(#[source] tonic::transport::Error),
    /// The call was answered with an error status.
    #[error("the call failed with {}: {}", .0.code(), .0.message())]
    Call(tonic::Status),
}

impl EndpointError {
    /// Whether trying again can succeed without anyone changing the node. A restarting kubelet deletes every
    /// socket in its directory, possibly between our bind and our self-check, and may re-create the directory
    /// itself; those and a failed self-check are worth a retry. A path that is too long, a directory we may not
    /// write or a read-only file system stays that way: the agent says so and exits.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::SelfCheck { .. } => true,
            Self::Listen { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::AddrInUse
                    | std::io::ErrorKind::AlreadyExists
                    | std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// A serving endpoint.
#[derive(Debug)]
pub struct RunningEndpoint {
    /// Which resource.
    pub kind: ResourceKind,
    /// The extended-resource name.
    pub resource_name: String,
    /// Full socket path.
    pub socket: PathBuf,
    /// The options it serves, sent again in the `RegisterRequest`.
    pub options: DevicePluginOptions,
    stopping: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningEndpoint {
    /// The socket's file name, which is what `RegisterRequest.endpoint` carries.
    pub fn file_name(&self) -> String {
        self.socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Starts serving `service` on `<dir>/<socket name>` and checks it answers.
    pub async fn start(
        dir: &Path,
        kind: ResourceKind,
        resource_name: &str,
        service: impl FnOnce(watch::Receiver<bool>) -> ResourceService,
    ) -> Result<Self, EndpointError> {
        let socket = dir.join(socket_file_name(resource_name));
        remove_socket(&socket);
        let listener = UnixListener::bind(&socket).map_err(|source| EndpointError::Listen {
            path: socket.clone(),
            source,
        })?;
        let (stopping, stop_rx) = watch::channel(false);
        let service = service(stop_rx.clone());
        let options = service.options();
        let mut shutdown = stop_rx;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service))
                // Any `:authority` a kubelet or gRPC client sends is served (see `authority`).
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener).map(|conn| conn.map(AnyAuthority::new)),
                    async move {
                        let _ = shutdown.wait_for(|stop| *stop).await;
                    },
                ),
        );
        let endpoint = Self {
            kind,
            resource_name: resource_name.to_owned(),
            socket,
            options,
            stopping,
            server,
        };
        if let Err(source) = endpoint.self_check().await {
            let path = endpoint.socket.clone();
            endpoint.stop().await;
            return Err(EndpointError::SelfCheck { path, source });
        }
        Ok(endpoint)
    }

    async fn self_check(&self) -> Result<(), SelfCheckError> {
        let channel = unix_channel(&self.socket)
            .await
            .map_err(SelfCheckError::Connect)?;
        DevicePluginClient::new(channel)
            .get_device_plugin_options(Empty {})
            .await
            .map_err(SelfCheckError::Call)?;
        Ok(())
    }

    /// Whether our socket file is still in place (a restarting kubelet deletes every socket in its directory).
    pub fn socket_exists(&self) -> bool {
        self.socket.exists()
    }

    /// Stops serving and removes the socket. Bounded: a server that does not wind down in a second is aborted.
    pub async fn stop(mut self) {
        let _ = self.stopping.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.server).await;
        // Dropping aborts a server still running and removes the socket.
    }
}

/// An endpoint dropped without [`RunningEndpoint::stop`] (its task was aborted at the stop bound, or panicked)
/// still stops serving and leaves no socket behind.
impl Drop for RunningEndpoint {
    fn drop(&mut self) {
        self.server.abort();
        remove_socket(&self.socket);
    }
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove socket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_follow_the_go_plugin() {
        assert_eq!(
            socket_file_name("volcano.sh/vgpu-number"),
            "nvidia-vgpu-number.sock"
        );
        assert_eq!(
            socket_file_name("volcano.sh/vgpu-memory"),
            "nvidia-vgpu-memory.sock"
        );
        assert_eq!(
            socket_file_name("volcano.sh/vgpu-cores"),
            "nvidia-vgpu-cores.sock"
        );
    }
}
