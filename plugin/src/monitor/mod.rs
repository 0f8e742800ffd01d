//! The node agent's watch over running containers: the shared regions' priority feedback and tamper guard
//! ([`feedback`]), removal of the directories of pods that are gone ([`cache_cleanup`]), the per-scrape node
//! snapshot behind the metrics ([`metrics`]), the host-PID broker the limiter asks its host PID of
//! ([`pid_broker`]), the memory backstop that checks each container's GPU memory as NVML sees it against its
//! cap ([`backstop`], with [`cgroup`] for which container a process is in), and the Events they publish
//! ([`events`]).

pub mod backstop;
pub mod cache_cleanup;
pub mod cgroup;
pub mod events;
pub mod feedback;
pub mod metrics;
pub mod pid_broker;
