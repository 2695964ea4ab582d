//! Files a test hands the gateway or a backend: configuration files and certificates.

use std::{net::SocketAddr, path::Path};

use crate::topology::Topology;

/// Writes `text` to `dir/name` and returns the path (as the command-line word it becomes).
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_string_lossy().into_owned()
}

/// A self-signed certificate for `name` (CN and SAN) in `dir`; returns (cert path, key path).
pub fn self_signed(dir: &Path, name: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    (
        write(dir, &format!("{name}.pem"), &cert.pem()),
        write(dir, &format!("{name}.key"), &key.serialize_pem()),
    )
}

/// The standard gateway's configuration file in front of `backends`, kernel programs required.
pub fn gateway_config(backends: &[SocketAddr]) -> String {
    format!(
        "listen = [\"{}\"]\nebpf = \"required\"\nbackends = [{}]\n",
        Topology::gateway_addr(),
        backends
            .iter()
            .map(|b| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
