//! The sidecar injector's webhook server. The injection itself (rules, template, patch) is `weft-inject`'s;
//! this crate serves it to the API server.

pub mod server;
