//! The kubelet side: the device-plugin gRPC service ([`service`]) served on one unix socket per resource
//! ([`endpoint`], with [`authority`] accepting every `:authority` old kubelets and gRPC clients send), its
//! registration ([`registration`]), and noticing that the kubelet restarted ([`socket_watch`]).

pub mod authority;
pub mod endpoint;
pub mod registration;
pub mod service;
pub mod socket_watch;
