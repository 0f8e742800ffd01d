//! What the `:authority` adapter costs on every kubelet call: unary `GetDevicePluginOptions` round trips over a
//! unix socket, to a tonic server behind the adapter and to one without it, on one connection as the kubelet
//! keeps it. A measurement, not a check: run it with
//! `cargo test --release -p vgpu-device-plugin --test authority_cost -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::time::{Duration, Instant};

use kubelet_api::v1beta1::device_plugin_client::DevicePluginClient;
use kubelet_api::v1beta1::device_plugin_server::{DevicePlugin, DevicePluginServer};
use kubelet_api::v1beta1::{
    AllocateRequest, AllocateResponse, DevicePluginOptions, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};
use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use vgpu_device_plugin::kubelet::authority::AnyAuthority;

/// A plugin that answers options and nothing else: the cost measured is the transport's.
struct Options;

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Options {
    type ListAndWatchStream = ListStream;

    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions::default()))
    }

    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<ListStream>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn allocate(
        &self,
        _: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }
}

async fn channel(socket: &std::path::Path) -> Channel {
    Endpoint::from_shared(format!("unix://{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Median and 99th percentile of `calls` round trips, after a warm-up.
async fn measure(channel: Channel, calls: usize) -> (Duration, Duration) {
    let mut client = DevicePluginClient::new(channel);
    for _ in 0..200 {
        client.get_device_plugin_options(Empty {}).await.unwrap();
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        client.get_device_plugin_options(Empty {}).await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    (times[calls / 2], times[calls * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
async fn round_trip_with_and_without_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.sock");
    let adapted = dir.path().join("adapted.sock");
    let plain_incoming = UnixListenerStream::new(UnixListener::bind(&plain).unwrap());
    let adapted_incoming = UnixListenerStream::new(UnixListener::bind(&adapted).unwrap())
        .map(|c| c.map(AnyAuthority::new));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(Options))
            .serve_with_incoming(plain_incoming),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(Options))
            .serve_with_incoming(adapted_incoming),
    );
    const CALLS: usize = 20_000;
    // Alternate to spread noise from the shared machine over both.
    for round in 1..=3 {
        let (p50, p99) = measure(channel(&plain).await, CALLS).await;
        let (a50, a99) = measure(channel(&adapted).await, CALLS).await;
        println!(
            "round {round}: {CALLS} GetDevicePluginOptions on one connection: without adapter p50 {p50:?} p99 \
             {p99:?}; with adapter p50 {a50:?} p99 {a99:?}"
        );
    }
}
