//! Registering an endpoint with the kubelet's `Registration` service, over its unix socket.

use std::path::Path;
use std::time::Duration;

use kubelet_api::v1beta1::registration_client::RegistrationClient;
use kubelet_api::v1beta1::{RegisterRequest, VERSION};
use tonic::transport::{Channel, Endpoint};

use kubelet_api::v1beta1::DevicePluginOptions;

/// How long a connection or a `Register` call to the kubelet may take.
pub const KUBELET_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a registration did not go through.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The kubelet's socket could not be reached.
    #[error("cannot connect to the kubelet at {socket}")]
    Connect {
        /// The kubelet socket.
        socket: String,
        /// Transport failure.
        #[source]
        source: tonic::transport::Error,
    },
    /// The kubelet answered with an error (wrong version, resource name taken, …).
    #[error("the kubelet refused to register {resource}: {message}")]
    Refused {
        /// The resource.
        resource: String,
        /// The kubelet's message.
        message: String,
    },
}

/// A channel over a unix socket; tonic needs a URI and takes the path from a `unix://` one.
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect_timeout(KUBELET_TIMEOUT)
        .timeout(KUBELET_TIMEOUT)
        .connect()
        .await
}

/// Registers `resource` served on `endpoint_file` (a file name in the kubelet's socket directory).
pub async fn register(
    kubelet_socket: &Path,
    endpoint_file: &str,
    resource: &str,
    options: DevicePluginOptions,
) -> Result<(), RegistrationError> {
    let channel =
        unix_channel(kubelet_socket)
            .await
            .map_err(|source| RegistrationError::Connect {
                socket: kubelet_socket.display().to_string(),
                source,
            })?;
    let request = RegisterRequest {
        version: VERSION.to_owned(),
        endpoint: endpoint_file.to_owned(),
        resource_name: resource.to_owned(),
        options: Some(options),
    };
    RegistrationClient::new(channel)
        .register(request)
        .await
        .map_err(|status| RegistrationError::Refused {
            resource: resource.to_owned(),
            message: status.message().to_owned(),
        })?;
    Ok(())
}
