//! The kubelet side: the device-plugin gRPC service ([`service`]) served on one unix socket per resource
//! ([`endpoint`], with [`authority`] accepting every `:authority` old kubelets and gRPC clients send), its
//! registration ([`registration`]), noticing that the kubelet restarted ([`socket_watch`]), and the lifecycle
//! that serves, registers, re-registers and finally drains and stops the endpoints ([`lifecycle`]).

pub mod answer;
pub mod authority;
pub mod endpoint;
pub mod lifecycle;
pub mod registration;
pub mod service;
pub mod socket_watch;
