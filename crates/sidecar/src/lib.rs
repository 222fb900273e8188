//! The contract between the injector and the proxy in a pod: the ports and environment the injector
//! writes and the proxy reads ([`pod`]), and the traffic capture rules of the pod's init step
//! ([`iptables`]), which the injector checks against a pod's annotations before it admits the pod.

pub mod iptables;
pub mod pod;
