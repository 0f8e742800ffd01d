//! The Allocate hand-off: which pending pod an Allocate call is for ([`selection`], pure), the pods the agent
//! sees ([`pod_cache`]) and every read and write of them on the Allocate path ([`store`]), what one call does
//! ([`decision`], pure), the reads, the decision and the writes in order ([`allocator`]), the node's annotations
//! the scheduler reads ([`node_annotations`]), and the record of what each container was given
//! ([`record`]), and the checks at start that the hand-off can work ([`start_check`]).

pub mod allocator;
pub mod decision;
pub mod node_annotations;
pub mod pod_cache;
pub mod record;
pub mod selection;
pub mod start_check;
pub mod store;
