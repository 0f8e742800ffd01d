//! The node agent's watch over running containers: the shared regions' priority feedback and tamper guard
//! ([`feedback`]), removal of the directories of pods that are gone ([`cache_cleanup`]), the per-scrape node
//! snapshot behind the metrics ([`metrics`]), and the host-PID broker the limiter asks its host PID of
//! ([`pid_broker`]).

pub mod cache_cleanup;
pub mod cgroup;
pub mod events;
pub mod feedback;
pub mod metrics;
pub mod pid_broker;
