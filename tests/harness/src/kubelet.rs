//! A fake kubelet device manager; see the crate docs.

mod authority;

pub use authority::AuthorityForm;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubelet_api::v1beta1::device_plugin_client::DevicePluginClient;
use kubelet_api::v1beta1::registration_server::{Registration, RegistrationServer};
use kubelet_api::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateRequest,
    ContainerPreferredAllocationRequest, Device, DevicePluginOptions, Empty,
    KUBELET_MAX_RECV_MESSAGE_BYTES, PreferredAllocationRequest, RegisterRequest, VERSION,
};
use tokio::net::UnixListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// What the fake kubelet knows about one registered resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceView {
    /// The `RegisterRequest` that created this view.
    pub registration: Option<RegisterRequest>,
    /// What `GetDevicePluginOptions` answered on dial-back.
    pub options: Option<DevicePluginOptions>,
    /// The latest `ListAndWatch` list.
    pub devices: Vec<Device>,
    /// How many `ListAndWatch` messages arrived on the current stream.
    pub updates: usize,
    /// The largest encoded `ListAndWatch` message seen.
    pub largest_message_bytes: usize,
    /// Set when the dial-back or the stream failed, with the reason.
    pub error: Option<String>,
    /// Whether the `ListAndWatch` stream is still open.
    pub streaming: bool,
}

#[derive(Debug, Default)]
struct State {
    registrations: Vec<RegisterRequest>,
    resources: HashMap<String, ResourceView>,
    streams: HashMap<String, JoinHandle<()>>,
}

#[derive(Debug, Clone)]
struct Shared {
    dir: PathBuf,
    /// What the dial-back calls send as `:authority`.
    authority: AuthorityForm,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("fake kubelet state"));
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A fake kubelet; see the crate docs.
#[derive(Debug)]
pub struct FakeKubelet {
    shared: Shared,
    socket: PathBuf,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl FakeKubelet {
    /// Serves `Registration` on `<dir>/kubelet.sock`; dials plugins back as kubelets from 1.26 do.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_authority(dir, AuthorityForm::Localhost).await
    }

    /// Like [`FakeKubelet::start`], with every dial-back call (`GetDevicePluginOptions`, `ListAndWatch`,
    /// `GetPreferredAllocation`, `Allocate`) carrying `:authority` in the given form.
    pub async fn start_with_authority(
        dir: &Path,
        authority: AuthorityForm,
    ) -> anyhow::Result<Self> {
        let (changed, _) = watch::channel(0);
        let shared = Shared {
            dir: dir.to_path_buf(),
            authority,
            state: Arc::default(),
            changed,
        };
        let mut kubelet = Self {
            shared,
            socket: dir.join("kubelet.sock"),
            server: None,
        };
        kubelet.serve()?;
        Ok(kubelet)
    }

    /// The kubelet's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The device-plugin directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket)
            .with_context(|| format!("bind {}", self.socket.display()))?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let service = RegistrationServer::new(RegistrationService {
            shared: self.shared.clone(),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
        Ok(())
    }

    async fn stop_serving(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        let mut state = self.shared.state.lock().expect("fake kubelet state");
        for (_, stream) in state.streams.drain() {
            stream.abort();
        }
        for view in state.resources.values_mut() {
            view.streaming = false;
        }
    }

    /// What a kubelet restart does to the directory: stop, delete every socket in it (ours and the plugins'),
    /// forget the registrations, then create and serve `kubelet.sock` again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop_serving().await;
        for entry in std::fs::read_dir(&self.shared.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "sock") {
                std::fs::remove_file(&path)
                    .with_context(|| format!("remove {}", path.display()))?;
            }
        }
        self.shared.update(|s| {
            s.resources.clear();
        });
        self.serve()
    }

    /// Stops serving and removes `kubelet.sock`, like a kubelet that went away.
    pub async fn stop(&mut self) {
        self.stop_serving().await;
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Every `RegisterRequest` received, in order, across restarts.
    pub fn registrations(&self) -> Vec<RegisterRequest> {
        self.shared
            .state
            .lock()
            .expect("fake kubelet state")
            .registrations
            .clone()
    }

    /// The current view of one resource.
    pub fn resource(&self, name: &str) -> Option<ResourceView> {
        self.shared
            .state
            .lock()
            .expect("fake kubelet state")
            .resources
            .get(name)
            .cloned()
    }

    /// Waits until `check` holds for the state, or fails after `timeout` with the last state in the message.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&HashMap<String, ResourceView>) -> bool,
    ) -> anyhow::Result<HashMap<String, ResourceView>> {
        let deadline = Instant::now() + timeout;
        let mut changed = self.shared.changed.subscribe();
        loop {
            {
                let state = self.shared.state.lock().expect("fake kubelet state");
                if check(&state.resources) {
                    return Ok(state.resources.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changed.changed()).await.is_err() {
                let state = self.shared.state.lock().expect("fake kubelet state");
                let summary: Vec<String> = state
                    .resources
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{k}: {} devices, streaming={}, error={:?}",
                            v.devices.len(),
                            v.streaming,
                            v.error
                        )
                    })
                    .collect();
                bail!("timed out after {timeout:?} waiting for {what}; kubelet sees {summary:?}");
            }
        }
    }

    /// Waits until every named resource is registered and has sent at least one device list.
    pub async fn wait_for_resources(
        &self,
        names: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<HashMap<String, ResourceView>> {
        self.wait_until(
            timeout,
            &format!("{names:?} to register and list devices"),
            |r| {
                names
                    .iter()
                    .all(|n| r.get(*n).is_some_and(|v| v.streaming && v.updates > 0))
            },
        )
        .await
    }

    /// A connection to the endpoint a resource registered.
    async fn plugin_channel(&self, resource: &str) -> anyhow::Result<Channel> {
        let endpoint = self
            .resource(resource)
            .and_then(|v| v.registration)
            .map(|r| r.endpoint)
            .with_context(|| format!("{resource} is not registered"))?;
        dial(&self.shared.dir.join(endpoint), self.shared.authority).await
    }

    /// Calls `GetPreferredAllocation` for one container, as the kubelet does before `Allocate` when the plugin
    /// offers it: `available` IDs, of which `size` are wanted.
    pub async fn preferred(
        &self,
        resource: &str,
        available: &[String],
        size: usize,
    ) -> anyhow::Result<Result<Vec<String>, Status>> {
        let channel = self.plugin_channel(resource).await?;
        let request = PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: available.to_vec(),
                must_include_device_i_ds: Vec::new(),
                allocation_size: i32::try_from(size)?,
            }],
        };
        Ok(DevicePluginClient::new(channel)
            .get_preferred_allocation(request)
            .await
            .map(|r| {
                r.into_inner()
                    .container_responses
                    .into_iter()
                    .flat_map(|c| c.device_i_ds)
                    .collect()
            }))
    }

    /// What the kubelet's device manager does for one container and one resource (`devicesToAllocate`, no
    /// topology): refuse when fewer than `size` IDs are healthy; ask the plugin for its preferred IDs among the
    /// healthy ones when it offers it, and keep only those that are healthy, at most `size`, in sorted order (a
    /// set); fill up from the sorted healthy IDs; then `Allocate` them. A plugin cannot get unknown IDs, or a
    /// wrong count, past a real kubelet, so it cannot here either.
    pub async fn admit(
        &self,
        resource: &str,
        size: usize,
    ) -> anyhow::Result<Result<AllocateResponse, Status>> {
        let view = self
            .resource(resource)
            .with_context(|| format!("{resource} is not registered"))?;
        let healthy: BTreeSet<String> = view
            .devices
            .iter()
            .filter(|d| d.health == "Healthy")
            .map(|d| d.id.clone())
            .collect();
        if healthy.len() < size {
            return Ok(Err(Status::resource_exhausted(format!(
                "requested number of devices unavailable for {resource}. Requested: {size}, Available: {}",
                healthy.len()
            ))));
        }
        let offers_preferred = view
            .options
            .as_ref()
            .is_some_and(|o| o.get_preferred_allocation_available);
        let mut chosen = BTreeSet::new();
        if offers_preferred {
            let available: Vec<String> = healthy.iter().cloned().collect();
            let preferred = match self.preferred(resource, &available, size).await? {
                Ok(ids) => ids.into_iter().collect::<BTreeSet<String>>(),
                Err(status) => return Ok(Err(status)),
            };
            chosen.extend(preferred.intersection(&healthy).take(size).cloned());
        }
        let missing = size - chosen.len();
        let fill: Vec<String> = healthy.difference(&chosen).take(missing).cloned().collect();
        chosen.extend(fill);
        let ids: Vec<&str> = chosen.iter().map(String::as_str).collect();
        self.allocate(resource, &ids).await
    }

    /// Calls `Allocate` on a registered resource's endpoint, one container asking for `ids`.
    pub async fn allocate(
        &self,
        resource: &str,
        ids: &[&str],
    ) -> anyhow::Result<Result<AllocateResponse, Status>> {
        let channel = self.plugin_channel(resource).await?;
        let request = AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: ids.iter().map(|s| s.to_string()).collect(),
            }],
        };
        Ok(DevicePluginClient::new(channel)
            .allocate(request)
            .await
            .map(Response::into_inner))
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        let state = self.shared.state.lock();
        if let Ok(mut state) = state {
            for (_, stream) in state.streams.drain() {
                stream.abort();
            }
        }
    }
}

/// A connection to a plugin's socket. The URI only gives tonic's client the `localhost` authority; every form
/// but that one is put on the wire by [`authority::RewriteAuthority`] under the client.
async fn dial(socket: &Path, form: AuthorityForm) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    let value = form.value(socket);
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            let value = value.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    authority::RewriteAuthority::new(stream, value),
                ))
            }
        }))
        .await
        .with_context(|| format!("dial {} with {form:?} :authority", socket.display()))
}

struct RegistrationService {
    shared: Shared,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    /// The kubelet's checks: supported version, an extended-resource name, an endpoint that is a file name.
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let request = request.into_inner();
        if request.version != VERSION {
            return Err(Status::invalid_argument(format!(
                "unsupported API version {:?}",
                request.version
            )));
        }
        let valid_name = request
            .resource_name
            .split_once('/')
            .is_some_and(|(domain, name)| {
                !domain.is_empty()
                    && !name.is_empty()
                    && !name.contains('/')
                    && !domain.starts_with("kubernetes.io")
            });
        if !valid_name {
            return Err(Status::invalid_argument(format!(
                "invalid extended resource name {:?}",
                request.resource_name
            )));
        }
        if request.endpoint.is_empty() || request.endpoint.contains('/') {
            return Err(Status::invalid_argument(format!(
                "endpoint {:?} is not a socket file name",
                request.endpoint
            )));
        }
        let resource = request.resource_name.clone();
        let socket = self.shared.dir.join(&request.endpoint);
        let shared = self.shared.clone();
        let stream = tokio::spawn(watch_plugin(shared.clone(), request.clone(), socket));
        shared.update(|s| {
            s.registrations.push(request.clone());
            if let Some(old) = s.streams.insert(resource.clone(), stream) {
                old.abort(); // a new registration replaces the old endpoint
            }
            s.resources.insert(
                resource,
                ResourceView {
                    registration: Some(request),
                    ..Default::default()
                },
            );
        });
        Ok(Response::new(Empty {}))
    }
}

/// Dial back, options first, then hold the `ListAndWatch` stream open and record every list.
async fn watch_plugin(shared: Shared, request: RegisterRequest, socket: PathBuf) {
    let resource = request.resource_name.clone();
    let fail = |why: String| {
        let resource = resource.clone();
        shared.update(move |s| {
            if let Some(v) = s.resources.get_mut(&resource) {
                v.error = Some(why);
                v.streaming = false;
            }
        });
    };
    let channel = match dial(&socket, shared.authority).await {
        Ok(c) => c,
        Err(e) => return fail(format!("{e:#}")),
    };
    let mut client =
        DevicePluginClient::new(channel).max_decoding_message_size(KUBELET_MAX_RECV_MESSAGE_BYTES);
    let options = match client.get_device_plugin_options(Empty {}).await {
        Ok(o) => o.into_inner(),
        Err(e) => return fail(format!("GetDevicePluginOptions: {e}")),
    };
    shared.update(|s| {
        if let Some(v) = s.resources.get_mut(&resource) {
            v.options = Some(options);
        }
    });
    let mut stream = match client.list_and_watch(Empty {}).await {
        Ok(s) => s.into_inner(),
        Err(e) => return fail(format!("ListAndWatch: {e}")),
    };
    shared.update(|s| {
        if let Some(v) = s.resources.get_mut(&resource) {
            v.streaming = true;
        }
    });
    loop {
        match stream.message().await {
            Ok(Some(list)) => {
                let bytes = prost::Message::encoded_len(&list);
                shared.update(|s| {
                    if let Some(v) = s.resources.get_mut(&resource) {
                        v.devices = list.devices;
                        v.updates += 1;
                        v.largest_message_bytes = v.largest_message_bytes.max(bytes);
                    }
                });
            }
            Ok(None) => return fail("ListAndWatch stream ended".into()),
            Err(e) => return fail(format!("ListAndWatch: {e}")),
        }
    }
}
