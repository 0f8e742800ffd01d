//! The agent's view of the cluster: the Kubernetes clients and the time bounds on everything they do, in one
//! place.
//!
//! Every apiserver call is bounded ([`ApiBounds`]): a connect timeout, a read timeout (no byte for that long
//! fails the request), and a bound on the whole wait for the response head. Requests and watches use two
//! clients because their read bounds differ: a request answers at once, a watch may be quiet until the
//! apiserver's bookmark, which it sends at the latest two seconds before the watch's own `timeoutSeconds`.
//! So watches ask for [`ApiBounds::watch_timeout`] and their connection fails after that plus one request
//! bound without a byte: a silent apiserver (hung, or a proxy that lost the stream) is noticed and the watch
//! restarted, instead of waiting forever on a connection that will never speak again.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kube::Client;
use kube::client::ClientBuilder;

/// The default bound on one apiserver request: the Allocate path's calls, node writes, start-up reads.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Start-up retries of an apiserver that does not answer begin this fast and back off to [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_millis(200);
/// The longest pause between retries of an apiserver call that got no answer (start-up, node writes).
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// The time bounds on every apiserver call, in one place. All derive from one request bound (10 s; a hidden
/// flag shortens it for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiBounds {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// A request: no response head within this fails it (and a body silent for half as long again).
    pub request: Duration,
    /// The `timeoutSeconds` every watch asks for: the apiserver ends the watch then (and sends a bookmark
    /// two seconds before), so a healthy watch is never silent for longer.
    pub watch_timeout: Duration,
}

impl Default for ApiBounds {
    fn default() -> Self {
        Self::new(REQUEST_TIMEOUT)
    }
}

impl ApiBounds {
    /// The bounds for a request bound of `request`: connect within half of it (at most 5 s); watches of six
    /// request bounds (60 s by default), at least 3 s so the apiserver's bookmark fits before the end.
    pub fn new(request: Duration) -> Self {
        let request = request.max(Duration::from_millis(100));
        Self {
            connect: (request / 2).min(Duration::from_secs(5)),
            request,
            watch_timeout: (request * 6).max(Duration::from_secs(3)),
        }
    }

    /// A watch's `timeoutSeconds`.
    pub fn watch_timeout_secs(&self) -> u32 {
        u32::try_from(self.watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX)
    }

    /// How long a watch connection may go without a byte before it is given up as silent: its own timeout
    /// (by then the apiserver has sent a bookmark or ended it) plus one request bound for the way.
    pub fn watch_silence(&self) -> Duration {
        self.watch_timeout + self.request
    }

    /// The longest a piece of state the agent writes (the node's register annotation) stays wrong after the
    /// apiserver answers again: a write caught in the outage fails within one request bound, and the next
    /// retry is at most [`RETRY_MAX`] later.
    pub fn write_recovery(&self) -> Duration {
        self.request + RETRY_MAX
    }
}

/// The pause between restarts of a failing watch: 200 ms doubling to [`RETRY_MAX`] (kube's default goes to
/// 30 s, which would add up to 30 s to every recovery after an outage), reset by the first event that arrives.
/// Each pause is shortened by up to a fifth at random, so the nodes of a cluster do not all come back to the
/// apiserver in the same instant after an outage.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: RETRY_START }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let pause = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        Some(pause - pause.mul_f64(f64::from(noise % 1000) / 5000.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = RETRY_START;
    }
}

/// The two clients the agent uses: one for requests, one for watches (longer read bound, see the module docs).
#[derive(Clone)]
pub struct ApiClients {
    /// Gets, lists, patches, Events.
    pub requests: Client,
    /// Watches (pods of this node, this Node), and the lists they start with.
    pub watches: Client,
    /// What the two were built with.
    pub bounds: ApiBounds,
}

impl std::fmt::Debug for ApiClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClients")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

/// Why the cluster side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No kubeconfig and not in a cluster.
    #[error(
        "cannot build a Kubernetes client (set KUBECONFIG, or run in a pod with a service account)"
    )]
    Client(#[source] kube::Error),
    /// The apiserver did not answer within the start-up wait.
    #[error(
        "the apiserver did not answer within {waited:?} (--apiserver-wait) while reading {what}; last error: {last}"
    )]
    Unreachable {
        /// How long we tried.
        waited: Duration,
        /// What we were reading.
        what: String,
        /// The last failure, on one line.
        last: String,
    },
    /// The apiserver answered with an error that retrying will not change (403, 401, 404 on a get, ...).
    #[error("the apiserver refused reading {what}")]
    Refused {
        /// What we were reading.
        what: String,
        /// Its answer.
        #[source]
        source: kube::Error,
    },
}

/// The clients for `KUBECONFIG`, `~/.kube/config` or the pod's service account, with `bounds` on every call.
pub async fn clients(bounds: ApiBounds) -> Result<ApiClients, ClusterError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Client(kube::Error::InferConfig(e)))?;
    config.connect_timeout = Some(bounds.connect);
    config.write_timeout = Some(bounds.request);
    // Counted from when a request is written, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    let build = |read: Duration| -> Result<Client, ClusterError> {
        let mut config = config.clone();
        config.read_timeout = Some(read);
        let builder = ClientBuilder::try_from(config).map_err(ClusterError::Client)?;
        Ok(builder
            .with_layer(&ResponseTimeout {
                limit: bounds.request,
            })
            .build())
    };
    Ok(ApiClients {
        // The response-head bound fires first on a server that does not answer, with a message that says so;
        // the read bound is for a body that stalls halfway.
        requests: build(bounds.request + bounds.request / 2)?,
        watches: build(bounds.watch_silence())?,
        bounds,
    })
}

/// A tower layer that fails a request whose response head has not arrived within `limit`: a read timeout
/// alone lets a connection that was never written to wait forever on some transports, and a slow-drip
/// server could keep resetting it.
#[derive(Debug, Clone, Copy)]
struct ResponseTimeout {
    limit: Duration,
}

impl<S> tower::Layer<S> for ResponseTimeout {
    type Service = ResponseTimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseTimeoutService {
            inner,
            limit: self.limit,
        }
    }
}

/// See [`ResponseTimeout`].
#[derive(Debug, Clone)]
pub struct ResponseTimeoutService<S> {
    inner: S,
    limit: Duration,
}

/// The error a request gets when the apiserver sends no response head in time.
#[derive(Debug, thiserror::Error)]
#[error("the apiserver did not answer within {0:?}")]
pub struct NoResponse(pub Duration);

impl<S, R> tower::Service<R> for ResponseTimeoutService<S>
where
    S: tower::Service<R>,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let call = self.inner.call(request);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer.map_err(Into::into),
                Err(_) => Err(Box::new(NoResponse(limit)) as tower::BoxError),
            }
        })
    }
}

/// Why one bounded apiserver call failed; the text names the call (`what`) and the cause on one line.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    /// The apiserver answered with an error, or could not be reached.
    #[error("{what}: {source}")]
    Failed {
        /// The call, e.g. "read pod ns/name".
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// No answer within the bound; the call may or may not have taken effect.
    #[error("{what}: no answer from the apiserver within {limit:?}")]
    TimedOut {
        /// The call.
        what: String,
        /// The bound it ran under.
        limit: Duration,
    },
}

/// One apiserver call under `limit` (on top of the client's own bounds, which a call made of several
/// requests does not have), as an error naming `what` on failure.
pub async fn bounded<T>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiCallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(|source| ApiCallError::Failed {
            what: what.to_owned(),
            source,
        }),
        Err(_) => Err(ApiCallError::TimedOut {
            what: what.to_owned(),
            limit,
        }),
    }
}

/// Retries `op` on errors that are not an answer (connection refused or reset, no answer within the request
/// bound, 5xx, 429) until `wait` has passed, saying each time what it is waiting for. Each attempt is bounded by
/// what is left of `wait`, so `wait` bounds the whole. An answer that retrying cannot change is returned at
/// once as [`ClusterError::Refused`].
pub async fn retry_unreachable<T, F, Fut>(
    wait: Duration,
    what: &str,
    mut op: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    let mut backoff = RETRY_START;
    let mut attempts = 0u32;
    loop {
        let left = wait.saturating_sub(start.elapsed());
        attempts += 1;
        // Even with nothing left of `wait`, one attempt is made (a zero wait means "do not retry").
        let limit = if left.is_zero() {
            REQUEST_TIMEOUT
        } else {
            left.min(REQUEST_TIMEOUT * 3)
        };
        let last = match tokio::time::timeout(limit, op()).await {
            Ok(Ok(v)) => {
                if attempts > 1 {
                    tracing::info!(
                        what,
                        waited_ms = start.elapsed().as_millis() as u64,
                        "apiserver answered"
                    );
                }
                return Ok(v);
            }
            Ok(Err(error)) if !is_unreachable(&error) => {
                return Err(ClusterError::Refused {
                    what: what.to_owned(),
                    source: error,
                });
            }
            Ok(Err(error)) => crate::error::error_chain(&error),
            Err(_) => format!("no answer within {limit:?}"),
        };
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(ClusterError::Unreachable {
                waited: start.elapsed(),
                what: what.to_owned(),
                last,
            });
        }
        tracing::warn!(
            what, error = %last, attempt = attempts, retry_in_ms = backoff.as_millis() as u64,
            gives_up_in_s = left.as_secs(), "waiting for the apiserver"
        );
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// Whether an error means "no answer" rather than an answer we must act on.
pub fn is_unreachable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::Service(_) | kube::Error::HyperError(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn every_bound_derives_from_the_request_bound() {
        let production = ApiBounds::default();
        assert_eq!(production.request, Duration::from_secs(10));
        assert_eq!(production.connect, Duration::from_secs(5));
        assert_eq!(production.watch_timeout_secs(), 60);
        assert_eq!(production.watch_silence(), Duration::from_secs(70));
        assert_eq!(production.write_recovery(), Duration::from_secs(15));
        let tests = ApiBounds::new(Duration::from_secs(1));
        assert_eq!(tests.watch_timeout_secs(), 6);
        assert_eq!(tests.watch_silence(), Duration::from_secs(7));
        // Never a watch too short for the apiserver's bookmark two seconds before its end.
        assert_eq!(
            ApiBounds::new(Duration::from_millis(1)).watch_timeout,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn watch_restarts_back_off_to_five_seconds_and_start_over_after_an_event() {
        let mut backoff = WatchBackoff::default();
        let pauses: Vec<Duration> = backoff.by_ref().take(8).collect();
        assert!(pauses[0] <= RETRY_START && pauses[0] >= RETRY_START * 4 / 5);
        assert!(pauses.iter().all(|p| *p <= RETRY_MAX), "{pauses:?}");
        assert!(pauses[7] >= RETRY_MAX * 4 / 5, "{pauses:?}");
        backoff.reset();
        assert!(backoff.next().unwrap() <= RETRY_START);
    }
}
