//! HTTP: `/metrics` (OpenMetrics text), `/healthz` (the process answers) and `/readyz` (the agent serves its
//! endpoints), on one listener, until shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exposition::{AgentMetrics, SnapshotSource};

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

/// Serves until `shutdown` resolves. `ready` carries `Err(reason)` while the agent is not serving.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<AgentMetrics>,
    source: Arc<dyn SnapshotSource>,
    ready: watch::Receiver<Result<(), String>>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, source, ready) = (Arc::clone(&metrics), Arc::clone(&source), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (metrics, source, ready) =
                    (Arc::clone(&metrics), Arc::clone(&source), ready.clone());
                async move { Ok::<_, Infallible>(route(request, metrics, source, ready).await) }
            });
            // Scrapers close idle connections; an error here is a client that went away.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
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
) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
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
            // NVML and the region files are read on a blocking thread, never on the runtime.
            let encoded = tokio::task::spawn_blocking(move || {
                let snapshot = source.snapshot();
                if openmetrics {
                    metrics.encode(&snapshot)
                } else {
                    metrics.encode_text(&snapshot)
                }
            })
            .await;
            let content_type = if openmetrics { OPENMETRICS } else { TEXT_004 };
            match encoded {
                Ok(Ok(body)) => text(StatusCode::OK, content_type, body),
                _ => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode the metrics\n".into(),
                ),
            }
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match &*ready.borrow() {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
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
}
