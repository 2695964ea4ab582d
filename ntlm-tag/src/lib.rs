//! ntlm-tag as a library: the binary (`main.rs`) is a thin shell around [`app::run`]; the fuzz targets
//! and benchmarks reach the parsers (`identity::proxy_header`, `identity::conn_id`,
//! `proxy::rewrite`) through here.

pub mod admin;
pub mod allocator;
pub mod app;
pub mod cli;
pub mod config;
pub mod descriptors;
pub mod epa;
pub mod error;
pub mod guard;
pub mod handover;
pub mod http1;
pub mod identity;
pub mod kernel;
pub mod manual;
pub mod metrics;
pub mod ntlm;
pub mod preflight;
pub mod present_fields;
pub mod proxy;
pub mod ready_deadline;
pub mod recycled;
pub mod registry;
pub mod service;
pub mod upstream;
