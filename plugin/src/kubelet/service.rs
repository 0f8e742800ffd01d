//! The `DevicePlugin` gRPC service of one resource. This is the gRPC edge: it converts between protobuf
//! messages and the domain (`devices`, `health`, `allocate`) and maps failures to `tonic::Status` in one place.

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use kubelet_api::v1beta1::device_plugin_server::DevicePlugin;
use kubelet_api::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, DevicePluginOptions, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use vgpu_metrics::{AgentMetrics, AllocateResult};

use crate::config::ResourceKind;
use crate::gpu::inventory::Inventory;
use crate::gpu::plan::DevicePlan;
use crate::handoff::allocator::{
    AllocateError, Allocator, Outcome, validate_allocate, validate_preferred,
};
use crate::handoff::selection::AllocatingEndpoint;
use crate::kubelet::answer;

/// What an endpoint answers to `GetDevicePluginOptions` and sends in `RegisterRequest.options`: the number
/// and memory endpoints prefer the scheduler's GPUs when they can hand off to Volcano.
pub fn plugin_options(kind: ResourceKind, volcano: bool) -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: volcano && kind != ResourceKind::Cores,
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
    allocator: Option<Arc<Allocator>>,
    metrics: Arc<AgentMetrics>,
}

impl ResourceService {
    /// `stopping` ends every open `ListAndWatch` stream when it turns true, so the server can shut down.
    /// Without an `allocator` (no `NODE_NAME`) the endpoint serves counts only.
    pub fn new(
        resource_name: String,
        plan: Arc<DevicePlan>,
        inventory: Arc<Inventory>,
        health: watch::Receiver<Vec<bool>>,
        stopping: watch::Receiver<bool>,
        allocator: Option<Arc<Allocator>>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            resource_name,
            plan,
            inventory,
            health,
            stopping,
            allocator,
            metrics,
        }
    }

    /// This endpoint's options.
    pub fn options(&self) -> DevicePluginOptions {
        plugin_options(self.plan.kind, self.allocator.is_some())
    }

    fn list(&self, healthy: &[bool]) -> ListAndWatchResponse {
        ListAndWatchResponse {
            devices: self.plan.devices(&self.inventory, healthy),
        }
    }

    fn endpoint(&self) -> Option<AllocatingEndpoint> {
        match self.plan.kind {
            ResourceKind::Number => Some(AllocatingEndpoint::Number),
            ResourceKind::Memory => Some(AllocatingEndpoint::Memory),
            ResourceKind::Cores => None,
        }
    }

    fn standalone_error(&self) -> Status {
        Status::failed_precondition(format!(
            "Allocate on {} needs the Volcano hand-off, which is off: the agent runs without NODE_NAME (set it \
             from the downward API, spec.nodeName) or without a Kubernetes client (KUBECONFIG or a service account)",
            self.resource_name
        ))
    }

    /// A request this resource cannot have: named with the call and the resource.
    fn invalid(&self, call: &str, cause: &str) -> Status {
        Status::invalid_argument(format!("{call} on {}: {cause}", self.resource_name))
    }
}

fn empty_responses(n: usize) -> Response<AllocateResponse> {
    Response::new(AllocateResponse {
        container_responses: vec![ContainerAllocateResponse::default(); n],
    })
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for ResourceService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(self.options()))
    }

    type ListAndWatchStream = ListStream;

    /// The full list at once, then again after every health change, until the endpoint stops. A stream over
    /// the health channel: nothing is spawned, and the stream is dropped when the kubelet hangs up.
    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let mut health = self.health.clone();
        let first = self.list(&health.borrow_and_update());
        tracing::info!(resource = %self.resource_name, devices = first.devices.len(), "kubelet opened ListAndWatch");
        let this = self.clone();
        let changes = WatchStream::from_changes(health).map(move |healthy| Ok(this.list(&healthy)));
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let lists = stream::once(std::future::ready(Ok(first)))
            .chain(changes)
            .take_until(stopped);
        Ok(Response::new(Box::pin(lists)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let Some(endpoint) = self.endpoint() else {
            return Err(Status::unimplemented(
                "GetPreferredAllocation is not offered for the cores resource",
            ));
        };
        let Some(allocator) = &self.allocator else {
            return Err(self.standalone_error());
        };
        let request = request.into_inner();
        // Everything is checked before anything is looked up or allocated: a size or an ID list the node
        // cannot have is the caller's mistake, refused with the field named (an allocation_size of 2^31 - 1
        // once made the agent reserve memory for that many IDs and abort).
        for container in &request.container_requests {
            let container = answer::preferred_request(container);
            validate_preferred(&self.inventory, &self.plan, &container)
                .map_err(|e| self.invalid("GetPreferredAllocation", &e.to_string()))?;
        }
        let healthy = self.health.borrow().clone();
        let mut container_responses = Vec::with_capacity(request.container_requests.len());
        for container in &request.container_requests {
            let container = answer::preferred_request(container);
            let device_i_ds = allocator
                .preferred(endpoint, &self.plan, &container, &healthy)
                .await;
            container_responses.push(ContainerPreferredAllocationResponse { device_i_ds });
        }
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let request = request.into_inner();
        for container in &request.container_requests {
            validate_allocate(&self.inventory, &self.plan, &container.devices_ids)
                .map_err(|e| self.invalid("Allocate", &e.to_string()))?;
        }
        // The cores resource only lends its count to the kubelet's bookkeeping.
        let Some(endpoint) = self.endpoint() else {
            return Ok(empty_responses(request.container_requests.len()));
        };
        let Some(allocator) = &self.allocator else {
            return match endpoint {
                AllocatingEndpoint::Number => Err(self.standalone_error()),
                AllocatingEndpoint::Memory => Ok(empty_responses(request.container_requests.len())),
            };
        };
        let mut container_responses = Vec::with_capacity(request.container_requests.len());
        for container in &request.container_requests {
            let started = std::time::Instant::now();
            // Read per container: a GPU marked unhealthy a moment ago is not handed out.
            let healthy = self.health.borrow().clone();
            let outcome = allocator
                .allocate(endpoint, container.devices_ids.len(), &healthy)
                .await;
            let result = match &outcome {
                Ok(Outcome::Handoff(_)) => AllocateResult::handed_off,
                Ok(Outcome::NotMine) => AllocateResult::empty,
                Err(AllocateError::NoPendingPod { .. }) => AllocateResult::no_pending_pod,
                Err(AllocateError::Pod { .. }) => AllocateResult::failed,
                Err(
                    AllocateError::Unreachable { .. }
                    | AllocateError::TimedOut { .. }
                    | AllocateError::Stopping { .. },
                ) => AllocateResult::unavailable,
            };
            self.metrics
                .allocate(&self.resource_name, result, started.elapsed().as_secs_f64());
            match outcome {
                Ok(Outcome::Handoff(handed)) => {
                    container_responses.push(answer::container_response(handed))
                }
                Ok(Outcome::NotMine) => {
                    container_responses.push(ContainerAllocateResponse::default())
                }
                Err(
                    error @ (AllocateError::Unreachable { .. }
                    | AllocateError::TimedOut { .. }
                    | AllocateError::Stopping { .. }),
                ) => {
                    return Err(Status::unavailable(error.to_string()));
                }
                Err(error) => return Err(Status::failed_precondition(error.to_string())),
            }
        }
        Ok(Response::new(AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharingSettings;
    use crate::gpu::inventory::Gpu;
    use kubelet_api::v1beta1::{HEALTHY, UNHEALTHY};
    use std::time::Duration;

    fn cores_service(
        health: watch::Receiver<Vec<bool>>,
        stopping: watch::Receiver<bool>,
    ) -> ResourceService {
        let inventory = Inventory {
            gpus: vec![Gpu {
                nvml_index: 0,
                uuid: "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1400".into(),
                model: "Tesla T4".into(),
                memory_bytes: 15360 << 20,
                minor: 0,
                numa_node: None,
                pci_bus_id: "00000000:07:00.0".into(),
            }],
        };
        let sharing = SharingSettings {
            split_count: 10,
            memory_factor: 1,
            core_scaling: 1.0,
            ..Default::default()
        };
        let plan = DevicePlan::new(ResourceKind::Cores, &inventory, &sharing)
            .unwrap_or_else(|e| panic!("{e}"));
        ResourceService::new(
            "volcano.sh/vgpu-cores".into(),
            Arc::new(plan),
            Arc::new(inventory),
            health,
            stopping,
            None,
            Arc::new(AgentMetrics::new("test")),
        )
    }

    async fn next(lists: &mut ListStream) -> Option<ListAndWatchResponse> {
        tokio::time::timeout(Duration::from_secs(5), lists.next())
            .await
            .unwrap_or_else(|_| panic!("no message and no end within 5 s"))
            .map(|list| list.unwrap_or_else(|status| panic!("{status}")))
    }

    fn all(list: &ListAndWatchResponse, health: &str) -> bool {
        !list.devices.is_empty() && list.devices.iter().all(|d| d.health == health)
    }

    #[tokio::test]
    async fn list_and_watch_sends_at_once_then_on_every_health_change_and_ends_when_the_endpoint_stops()
     {
        let (health_tx, health) = watch::channel(vec![true]);
        let (stop_tx, stopping) = watch::channel(false);
        let service = cores_service(health, stopping);
        let mut lists = service
            .list_and_watch(Request::new(Empty {}))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        let first = next(&mut lists).await.expect("the list at once");
        assert_eq!(first.devices.len(), 100);
        assert!(all(&first, HEALTHY));
        health_tx.send_replace(vec![false]);
        assert!(all(
            &next(&mut lists).await.expect("a list after the change"),
            UNHEALTHY
        ));
        health_tx.send_replace(vec![true]);
        assert!(all(
            &next(&mut lists).await.expect("a list after the recovery"),
            HEALTHY
        ));
        stop_tx.send_replace(true);
        assert!(
            next(&mut lists).await.is_none(),
            "the stream ends when the endpoint stops"
        );
    }

    #[tokio::test]
    async fn list_and_watch_ends_when_the_health_monitor_is_gone() {
        let (health_tx, health) = watch::channel(vec![true]);
        let (_stop_tx, stopping) = watch::channel(false);
        let service = cores_service(health, stopping);
        let mut lists = service
            .list_and_watch(Request::new(Empty {}))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert!(next(&mut lists).await.is_some());
        drop(service);
        drop(health_tx);
        assert!(next(&mut lists).await.is_none());
    }
}
