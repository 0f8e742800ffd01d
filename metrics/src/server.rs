//! HTTP: `/metrics` (OpenMetrics text), `/healthz` (the process answers) and `/readyz` (the agent serves its
//! endpoints), on one listener, until shutdown.
//!
//! What a client can hold is bounded ([`Limits`]): at most [`MAX_CONNECTIONS`] connections (more are closed on
//! accept), each closed if its first request's headers are not in within [`HEADER_READ_TIMEOUT`] or it sits idle
//! for [`IDLE_TIMEOUT`]; and scrapes share one encoded exposition (see [`SharedScrape`]), so fifty scrapers at
//! once cost one snapshot, not fifty.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::exposition::{AgentMetrics, SnapshotSource, openmetrics_to_text};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `:9394` (all interfaces), `127.0.0.1:9394` or `[::1]:9394`, as `--metrics-bind-address` takes it.
pub fn parse_bind_address(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_owned()
    };
    full.parse().map_err(|_| {
        format!("{text:?} is not an address: expected host:port or :port, such as :9394")
    })
}

/// How many connections the listener holds at once. One more is accepted and closed at once (counted in the
/// log at debug), so a flood of idle or half-sent connections costs the agent at most this many descriptors and
/// never the ones Allocate, the kubelet and the apiserver need. Prometheus holds one per scrape target.
pub const MAX_CONNECTIONS: usize = 128;

/// How long a connection may take to deliver its first request's headers (HTTP/1 later requests: the same, by
/// hyper's header-read timeout).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may sit with no request in flight and no byte moving before it is closed.
/// Prometheus scrapes every 15–60 s and simply reconnects.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Bounds of one listener (tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// Serves until `shutdown` resolves. `ready` carries `Err(reason)` while the agent is not serving.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<AgentMetrics>,
    source: Arc<dyn SnapshotSource>,
    ready: watch::Receiver<Result<(), String>>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(
        listener,
        metrics,
        source,
        ready,
        shutdown,
        Limits::default(),
    )
    .await;
}

/// [`serve`] with explicit bounds.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<AgentMetrics>,
    source: Arc<dyn SnapshotSource>,
    ready: watch::Receiver<Result<(), String>>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let scrapes = Arc::new(SharedScrape::default());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Full: close it now rather than hold a descriptor for it.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max = limits.max_connections,
                    "metrics listener full; closing new connections until old ones finish or time out"
                );
            }
            drop(stream);
            continue;
        };
        let (metrics, source, ready, scrapes, builder) = (
            Arc::clone(&metrics),
            Arc::clone(&source),
            ready.clone(),
            Arc::clone(&scrapes),
            Arc::clone(&builder),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let activity = Arc::new(Activity::new());
            let service = {
                let activity = Arc::clone(&activity);
                service_fn(move |request: Request<Incoming>| {
                    let (metrics, source, ready, scrapes, activity) = (
                        Arc::clone(&metrics),
                        Arc::clone(&source),
                        ready.clone(),
                        Arc::clone(&scrapes),
                        Arc::clone(&activity),
                    );
                    async move {
                        let _in_flight = activity.request();
                        Ok::<_, Infallible>(route(request, metrics, source, ready, &scrapes).await)
                    }
                })
            };
            let io = TokioIo::new(Tracked {
                inner: stream,
                activity: Arc::clone(&activity),
            });
            let connection = builder.serve_connection(io, service);
            // Scrapers close idle connections; an error here is a client that went away. A connection that
            // stalls is dropped by the watchdog, which closes its socket.
            tokio::select! {
                _ = connection => {}
                () = activity.watchdog(limits) => {}
            }
        });
    }
}

/// What one connection has done, for its watchdog.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last byte read or written.
    last_io_ms: AtomicU64,
    /// Requests begun.
    requests: AtomicU64,
    /// Requests being answered.
    in_flight: AtomicU64,
}

/// Decrements the in-flight count when a request is answered (or dropped).
struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    fn request(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Resolves when the connection should be closed: no complete request header within the header timeout
    /// of connecting, or idle (nothing in flight, no byte moved) for the idle timeout.
    async fn watchdog(&self, limits: Limits) {
        loop {
            let deadline = if self.requests.load(Ordering::Relaxed) == 0 {
                self.started + limits.header_read_timeout
            } else if self.in_flight.load(Ordering::Relaxed) > 0 {
                // Answering: the scrape itself is bounded by the shared encoding; look again later.
                Instant::now() + limits.idle_timeout
            } else {
                self.started
                    + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
                    + limits.idle_timeout
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The connection's socket, stamping [`Activity`] on every read and write.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One encoded exposition shared by the scrapes that arrive while it is being made: at most one snapshot and
/// encoding runs at a time, and a scrape that waited for it takes its result instead of making another (the
/// result is never older than the scrape's arrival by more than one encoding).
#[derive(Debug, Default)]
struct SharedScrape {
    latest: tokio::sync::Mutex<Option<Encoded>>,
}

#[derive(Debug)]
struct Encoded {
    finished: Instant,
    openmetrics: Bytes,
    /// The text format 0.0.4 of the same exposition, made on first demand.
    text: Option<Bytes>,
}

impl SharedScrape {
    async fn get(
        &self,
        openmetrics: bool,
        metrics: Arc<AgentMetrics>,
        source: Arc<dyn SnapshotSource>,
    ) -> Option<Bytes> {
        let arrived = Instant::now();
        let mut latest = self.latest.lock().await;
        let fresh = latest.as_ref().is_some_and(|e| e.finished >= arrived);
        if !fresh {
            // NVML and the region files are read on a blocking thread, never on the runtime.
            let body = tokio::task::spawn_blocking(move || metrics.encode_owned(source.snapshot()))
                .await
                .ok()?
                .ok()?;
            *latest = Some(Encoded {
                finished: Instant::now(),
                openmetrics: Bytes::from(body),
                text: None,
            });
        }
        let encoded = latest.as_mut()?;
        if openmetrics {
            return Some(encoded.openmetrics.clone());
        }
        if encoded.text.is_none() {
            let text = std::str::from_utf8(&encoded.openmetrics)
                .ok()
                .map(openmetrics_to_text)?;
            encoded.text = Some(Bytes::from(text));
        }
        encoded.text.clone()
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

async fn route(
    request: Request<Incoming>,
    metrics: Arc<AgentMetrics>,
    source: Arc<dyn SnapshotSource>,
    ready: watch::Receiver<Result<(), String>>,
    scrapes: &SharedScrape,
) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match request.uri().path() {
        "/metrics" => {
            // Prometheus asks for OpenMetrics; everything else (curl, promtool, older scrapers) gets the text
            // format 0.0.4, as from the Go monitor.
            let openmetrics = request
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let encoded = scrapes.get(openmetrics, metrics, source).await;
            let content_type = if openmetrics { OPENMETRICS } else { TEXT_004 };
            match encoded {
                Some(body) => text(StatusCode::OK, content_type, body),
                None => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode the metrics\n",
                ),
            }
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match &*ready.borrow() {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::{GpuSample, Snapshot};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug)]
    struct OneGpu;

    impl SnapshotSource for OneGpu {
        fn snapshot(&self) -> Snapshot {
            Snapshot {
                gpus: vec![GpuSample {
                    index: 0,
                    uuid: "GPU-a".into(),
                    memory_used_bytes: Some(5),
                    memory_total_bytes: 10,
                    utilization_percent: Some(1),
                    healthy: true,
                    vgpus_allocated: 0,
                }],
                containers: vec![],
                now_unix: 0,
                ..Default::default()
            }
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        get_accepting(addr, path, "*/*").await
    }

    async fn get_accepting(addr: SocketAddr, path: &str, accept: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn bind_addresses_parse_like_the_go_flag() {
        assert_eq!(
            parse_bind_address(":9394").unwrap().to_string(),
            "0.0.0.0:9394"
        );
        assert_eq!(
            parse_bind_address("127.0.0.1:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert_eq!(
            parse_bind_address("[::1]:9394").unwrap().to_string(),
            "[::1]:9394"
        );
        assert!(parse_bind_address("9394").unwrap_err().contains(":9394"));
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ready_tx, ready) = watch::channel(Err("NVML not loaded".to_owned()));
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(AgentMetrics::new("t")),
            Arc::new(OneGpu),
            ready,
            async {
                let _ = stop.await;
            },
        ));

        // What Prometheus sends.
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                      version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let metrics = get_accepting(addr, "/metrics", accept).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("application/openmetrics-text"));
        assert!(
            metrics.contains("vgpu_gpu_memory_total_bytes{gpu_uuid=\"GPU-a\",gpu_index=\"0\"} 10"),
            "{metrics}"
        );
        assert!(metrics.contains("# TYPE vgpu_agent_build info") && metrics.ends_with("# EOF\n"));
        // What curl and promtool get.
        let plain = get(addr, "/metrics").await;
        assert!(plain.contains("text/plain; version=0.0.4"), "{plain}");
        assert!(
            plain.contains("vgpu_gpu_memory_total_bytes{gpu_uuid=\"GPU-a\",gpu_index=\"0\"} 10")
        );
        assert!(plain.contains("# TYPE vgpu_agent_build_info gauge\nvgpu_agent_build_info{"));
        assert!(!plain.contains("# EOF"), "{plain}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(
            not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("NVML not loaded"),
            "{not_ready}"
        );
        ready_tx.send(Ok(())).unwrap();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        stop_tx.send(()).unwrap();
        server.await.unwrap();
    }

    /// A source that counts its snapshots and takes `delay` over each, like NVML and many region files.
    #[derive(Debug)]
    struct Slow {
        calls: std::sync::atomic::AtomicUsize,
        delay: Duration,
    }

    impl SnapshotSource for Slow {
        fn snapshot(&self) -> Snapshot {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            OneGpu.snapshot()
        }
    }

    async fn start(
        source: Arc<dyn SnapshotSource>,
        limits: Limits,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_ready_tx, ready) = watch::channel(Ok(()));
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_with(
            listener,
            Arc::new(AgentMetrics::new("t")),
            source,
            ready,
            async {
                let _ = stop.await;
            },
            limits,
        ));
        (addr, stop_tx)
    }

    /// Whether the server closed `stream` (EOF or reset) within `within`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(within, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                // A response (e.g. a 408 from hyper) before the close.
                Ok(Ok(_)) => continue,
            }
        }
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed_and_the_rest_capped() {
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
        };
        let (addr, stop) = start(Arc::new(OneGpu), limits).await;
        // Four connections that send nothing, one that sends half a request line.
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metr").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The listener is full: a fifth is closed at once.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_millis(200)).await,
            "a connection over the cap is closed at once"
        );
        // The silent and the half-sent ones go after the header-read timeout.
        for stream in silent.iter_mut().chain(std::iter::once(&mut half)) {
            assert!(
                closed_within(stream, Duration::from_secs(2)).await,
                "a connection that never completes its headers is closed"
            );
        }
        // Room again: a scrape works.
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));

        // A keep-alive connection that answered one request and then idles is closed after the idle timeout,
        // and not before (a scraper between scrapes).
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            !closed_within(&mut kept, Duration::from_millis(300)).await,
            "closed before the idle timeout"
        );
        assert!(
            closed_within(&mut kept, Duration::from_secs(2)).await,
            "an idle keep-alive connection is closed"
        );
        stop.send(()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_that_arrive_together_share_one_snapshot_and_encoding() {
        let source = Arc::new(Slow {
            calls: std::sync::atomic::AtomicUsize::new(0),
            delay: Duration::from_millis(300),
        });
        let (addr, stop) = start(
            Arc::clone(&source) as Arc<dyn SnapshotSource>,
            Limits::default(),
        )
        .await;
        let scrapes: Vec<_> = (0..20)
            .map(|i| {
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        get_accepting(addr, "/metrics", "application/openmetrics-text").await
                    } else {
                        get(addr, "/metrics").await
                    }
                })
            })
            .collect();
        for (i, scrape) in scrapes.into_iter().enumerate() {
            let body = scrape.await.unwrap();
            assert!(body.starts_with("HTTP/1.1 200"), "{body}");
            assert!(body.contains("vgpu_gpu_memory_total_bytes"));
            // Each still gets the format it asked for.
            assert_eq!(body.contains("# EOF"), i % 2 == 0, "{body}");
        }
        let calls = source.calls.load(Ordering::SeqCst);
        assert!(
            calls <= 2,
            "20 scrapes arriving together took {calls} snapshots (one, or two if some arrived after the first began)"
        );
        // A scrape after those is fresh, not a cached copy.
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 200"));
        assert_eq!(source.calls.load(Ordering::SeqCst), calls + 1);
        stop.send(()).unwrap();
    }
}
