//! weftctl: Weft's command line. `weftctl demo` runs a whole mesh on this machine: weftd, a proxy per
//! workload on its own 127.0.0.x address, and our sample application; it drives traffic through a
//! routing rule and reports whether the traffic did what the rule says.

pub mod demo;
pub mod install;
pub mod manifest;
pub mod sample_app;
