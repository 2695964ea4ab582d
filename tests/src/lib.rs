//! Test harness for ntlm-tag integration tests: namespaces, a real gateway process, a recording
//! backend and an HTTP client, composed into topologies that read like the scenario they check.

pub mod acceptor;
pub mod backend;
pub mod cleanup;
pub mod client;
pub mod epa_client;
pub mod gateway;
pub mod haproxy;
pub mod keepalive_client;
pub mod netns;
pub mod packets;
pub mod programs;
pub mod raw;
pub mod topology;
