//! Kubernetes Events on pods from the monitor's loops ([`super::feedback`]'s tamper reports,
//! [`super::backstop`]'s memory reports), published from a bounded queue on their own task: a slow or hung
//! apiserver never delays a round, each publish is bounded in time, and what overflows the queue is dropped
//! (the caller's log line and counter still say it).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use vgpu_metrics::AgentMetrics;

/// Where a monitor loop's reports go besides the log: the agent's counters and Events on the pods.
#[derive(Clone)]
pub struct Reporting {
    /// The agent's counters (`vgpu_agent_region_tampering_total`, `vgpu_container_memory_violations_total`).
    pub metrics: Option<Arc<AgentMetrics>>,
    /// Records Events on the pods (none without a cluster: standalone mode logs and counts only).
    pub client: Option<Client>,
    /// This node, as the Events' reporting instance.
    pub node: Option<String>,
    /// The bound on one Event's publish (the apiserver request bound, `crate::cluster::ApiBounds::request`).
    pub event_timeout: Duration,
}

impl Default for Reporting {
    fn default() -> Self {
        Self {
            metrics: None,
            client: None,
            node: None,
            event_timeout: crate::cluster::REQUEST_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for Reporting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporting")
            .field("events", &self.client.is_some())
            .field("node", &self.node)
            .field("event_timeout", &self.event_timeout)
            .finish()
    }
}

impl Reporting {
    /// The publisher of this loop's Events (`what` names the loop in its log lines); none without a cluster.
    pub fn publisher(&self, what: &'static str) -> Option<EventPublisher> {
        self.client.clone().map(|client| {
            EventPublisher::start(client, self.node.clone(), self.event_timeout, what)
        })
    }
}

/// Events waiting to be published; more are dropped.
pub const EVENT_QUEUE: usize = 256;

/// One Event on one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID (empty: not known).
    pub pod_uid: String,
    /// `reason` (CamelCase, e.g. `VGPUMemoryOverLimit`).
    pub reason: &'static str,
    /// `action` (what the agent did, CamelCase).
    pub action: &'static str,
    /// The human-readable note.
    pub note: String,
}

/// Publishes [`PodEvent`]s from a queue until dropped (then its task is aborted).
pub struct EventPublisher {
    queue: tokio::sync::mpsc::Sender<PodEvent>,
    task: tokio::task::JoinHandle<()>,
    dropped: u64,
    what: &'static str,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("what", &self.what)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventPublisher {
    /// Starts publishing as controller `vgpu-device-plugin`, instance `node`; each publish is given up after
    /// `timeout`. `what` names the Events in the overflow warning. Needs a tokio runtime.
    pub fn start(
        client: Client,
        node: Option<String>,
        timeout: Duration,
        what: &'static str,
    ) -> Self {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "vgpu-device-plugin".into(),
                instance: node,
            },
        );
        let (queue, mut pending) = tokio::sync::mpsc::channel::<PodEvent>(EVENT_QUEUE);
        let task = tokio::spawn(async move {
            while let Some(event) = pending.recv().await {
                publish(&recorder, &event, timeout).await;
            }
        });
        Self {
            queue,
            task,
            dropped: 0,
            what,
        }
    }

    /// Queues `event`, or drops it when the queue is full (warned at powers of two).
    pub fn send(&mut self, event: PodEvent) {
        if self.queue.try_send(event).is_err() {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped,
                    what = self.what,
                    "Events are not being published fast enough; dropping some (logged and counted still)"
                );
            }
        }
    }
}

/// The apiserver refuses an `events.k8s.io/v1` note over 1 KiB: longer ones are cut at a character boundary.
pub const NOTE_LIMIT: usize = 1024;

fn bounded_note(note: &str) -> String {
    if note.len() <= NOTE_LIMIT {
        return note.to_owned();
    }
    let mut end = NOTE_LIMIT - "…".len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

async fn publish(recorder: &Recorder, e: &PodEvent, timeout: Duration) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(e.namespace.clone()),
        name: Some(e.pod.clone()),
        uid: Some(e.pod_uid.clone()).filter(|u| !u.is_empty()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: e.reason.into(),
        note: Some(bounded_note(&e.note)),
        action: e.action.into(),
        secondary: None,
    };
    match tokio::time::timeout(timeout, recorder.publish(&event, &reference)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, pod = %e.pod, reason = e.reason, "cannot record an Event")
        }
        Err(_) => tracing::warn!(pod = %e.pod, reason = e.reason, "recording an Event timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_to_the_apiserver_limit_at_a_character_boundary() {
        assert_eq!(bounded_note("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded_note(&long);
        assert!(
            cut.len() <= NOTE_LIMIT && cut.ends_with('…'),
            "{}",
            cut.len()
        );
    }
}
