//! The Allocate hand-off: which pending pod an Allocate call is for ([`selection`], pure), the pods the agent
//! sees ([`pod_cache`]), the decision and the writes back to the pod ([`allocator`]), the node's annotations
//! the scheduler reads ([`node_annotations`]), and the record of what each container was given
//! ([`record`]), and the checks at start that the hand-off can work ([`start_check`]).

pub mod allocator;
pub mod node_annotations;
pub mod pod_cache;
pub mod record;
pub mod selection;
pub mod start_check;
