//! The `DevicePlugin` gRPC service of one resource. This is the gRPC edge: it converts between protobuf
//! messages and the domain (`devices`, `health`) and maps failures to `tonic::Status` in one place.

use std::pin::Pin;
use std::sync::Arc;

use kubelet_api::v1beta1::device_plugin_server::DevicePlugin;
use kubelet_api::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse, DevicePluginOptions, Empty,
    ListAndWatchResponse, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::devices::{DevicePlan, ResourceKind};
use crate::inventory::Inventory;

/// What every endpoint answers to `GetDevicePluginOptions` and sends in `RegisterRequest.options`.
pub fn plugin_options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: false,
    }
}

/// One resource's endpoint.
#[derive(Debug, Clone)]
pub struct ResourceService {
    resource_name: String,
    plan: Arc<DevicePlan>,
    inventory: Arc<Inventory>,
    health: watch::Receiver<Vec<bool>>,
    stopping: watch::Receiver<bool>,
}

impl ResourceService {
    /// `stopping` ends every open `ListAndWatch` stream when it turns true, so the server can shut down.
    pub fn new(
        resource_name: String,
        plan: Arc<DevicePlan>,
        inventory: Arc<Inventory>,
        health: watch::Receiver<Vec<bool>>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            resource_name,
            plan,
            inventory,
            health,
            stopping,
        }
    }

    fn list(&self, healthy: &[bool]) -> ListAndWatchResponse {
        ListAndWatchResponse {
            devices: self.plan.devices(&self.inventory, healthy),
        }
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for ResourceService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(plugin_options()))
    }

    type ListAndWatchStream = ListStream;

    /// The full list at once, then again after every health change, until the endpoint stops.
    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(2);
        let mut health = self.health.clone();
        let mut stopping = self.stopping.clone();
        let this = self.clone();
        let first = this.list(&health.borrow_and_update());
        tracing::info!(resource = %self.resource_name, devices = first.devices.len(), "kubelet opened ListAndWatch");
        tokio::spawn(async move {
            let mut next = Some(first);
            loop {
                if let Some(list) = next.take()
                    && tx.send(Ok(list)).await.is_err()
                {
                    return; // the kubelet hung up
                }
                tokio::select! {
                    changed = health.changed() => {
                        if changed.is_err() { return; }
                        let healthy = health.borrow_and_update().clone();
                        next = Some(this.list(&healthy));
                    }
                    _ = stopping.wait_for(|stop| *stop) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        // Advertised as unavailable in the options, so a conforming kubelet never calls it.
        Err(Status::unimplemented(
            "GetPreferredAllocation is not offered by this endpoint",
        ))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let request = request.into_inner();
        match self.plan.kind {
            ResourceKind::Number => Err(Status::unimplemented(format!(
                "Allocate on {} is not implemented yet: this build serves device counts only and does not read \
                 Volcano's pod annotations, so it cannot place the limiter into the container",
                self.resource_name
            ))),
            // The number endpoint does the work for a container; these two only lend their counts to the
            // kubelet's bookkeeping, so each container gets an empty response.
            ResourceKind::Memory | ResourceKind::Cores => Ok(Response::new(AllocateResponse {
                container_responses: vec![
                    ContainerAllocateResponse::default();
                    request.container_requests.len()
                ],
            })),
        }
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}
