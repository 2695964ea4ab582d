//! Whether and how the kernel programs are used, as the configuration builds it.
#![forbid(unsafe_code)]

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Load the kernel programs; if that fails, fall back to the accepted peer address with one warning.
    Auto,
    /// Refuse to start unless the kernel programs load and attach.
    Required,
    /// Do not load kernel programs; identities are the accepted peer address.
    Off,
}

#[derive(Debug, Clone)]
pub struct EbpfConfig {
    pub mode: EbpfMode,
    pub map_entries: u32,
    /// TCP option kind of TOA; 0 (the default): off.
    pub toa_kind: u8,
    /// Interfaces with the IPIP-decapsulating XDP program.
    pub xdp_interfaces: Vec<String>,
}
