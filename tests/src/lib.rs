//! Test harness for ntlm-tag integration tests: namespaces, a real gateway process, a recording
//! backend and an HTTP client, composed into topologies that read like the scenario they check.

pub mod acceptor;
pub mod acceptor_log;
pub mod backends;
pub mod cleanup;
pub mod client;
pub mod epa_client;
pub mod fixtures;
pub mod gateway;
pub mod haproxy;
pub mod keepalive_client;
pub mod metrics;
pub mod netns;
pub mod packets;
pub mod procfs;
pub mod programs;
pub mod raw;
pub mod topology;
pub mod wait;
