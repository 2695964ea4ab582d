//! The trusted balancer lists, one per mechanism (PROXY header, TOA, IPIP), with the fallback to
//! `trusted_lbs`, normalisation, and warnings for prefixes that trust a whole address family.
#![forbid(unsafe_code)]

use crate::identity::trust::{TrustLists, covers_a_whole_family, normalise};

use super::{ConfigError, ConfigWarning};

/// The trust lists as given (flags, else file), before normalisation and fallback.
pub(super) struct TrustInput {
    pub(super) proxy: Vec<ipnet::IpNet>,
    pub(super) toa: Vec<ipnet::IpNet>,
    pub(super) ipip: Vec<ipnet::IpNet>,
}

/// Flags replace the file's list.
pub(super) fn pick_list(
    flags: &[ipnet::IpNet],
    file: Option<Vec<ipnet::IpNet>>,
) -> Vec<ipnet::IpNet> {
    if flags.is_empty() {
        file.unwrap_or_default()
    } else {
        flags.to_vec()
    }
}

/// One list per mechanism: `trusted_lbs` is PROXY protocol's, and the list TOA and IPIP fall back
/// to when they have none of their own. TOA is on only with a `toa_kind`, IPIP only with `xdp`
/// interfaces; a list for a mechanism that is off is refused (it would suggest trust that is not
/// there), and so is a mechanism that is on with nobody to trust.
pub(super) fn build_trust(
    input: TrustInput,
    toa_kind: u8,
    xdp_on: bool,
) -> Result<(TrustLists, Vec<ConfigWarning>), ConfigError> {
    let normalised = |list: Vec<ipnet::IpNet>| -> Vec<ipnet::IpNet> {
        let mut out: Vec<ipnet::IpNet> = Vec::with_capacity(list.len());
        for net in list.into_iter().map(normalise) {
            if !out.contains(&net) {
                out.push(net);
            }
        }
        out
    };
    let proxy = normalised(input.proxy);
    let own_toa = normalised(input.toa);
    let own_ipip = normalised(input.ipip);
    let mut warnings = Vec::new();
    let mut uses_of_proxy_list = vec!["PROXY protocol"];
    let (toa_has_own, ipip_has_own) = (!own_toa.is_empty(), !own_ipip.is_empty());

    let toa = match (toa_kind, own_toa.is_empty()) {
        (0, true) => Vec::new(),
        (0, false) => {
            return Err(ConfigError::invalid(
                "toa_trusted_lbs",
                "TOA is off, so no balancer can be trusted for it; set toa_kind (--toa-kind, \
                 254 for LVS FULLNAT / DPVS) to turn it on, or remove the list",
            ));
        }
        (_, false) => own_toa,
        (kind, true) if proxy.is_empty() => {
            return Err(ConfigError::invalid(
                "toa_trusted_lbs",
                format!(
                    "toa_kind {kind} turns TOA on, but no balancer is trusted to send it; add \
                     --toa-trusted-lb CIDR (or `toa_trusted_lbs`, or `trusted_lbs`, which TOA falls \
                     back to)"
                ),
            ));
        }
        (_, true) => {
            uses_of_proxy_list.push("TOA");
            proxy.clone()
        }
    };
    let ipip = match (xdp_on, own_ipip.is_empty()) {
        (false, true) => Vec::new(),
        (false, false) => {
            return Err(ConfigError::invalid(
                "ipip_trusted_lbs",
                "no XDP interface is configured, so no tunnel is decapsulated; add --xdp IFACE \
                 (or `xdp = [...]`) to turn IPIP on, or remove the list",
            ));
        }
        (true, false) => own_ipip,
        (true, true) if proxy.is_empty() => {
            return Err(ConfigError::invalid(
                "ipip_trusted_lbs",
                "XDP decapsulation only accepts tunnels from trusted balancers; add \
                 --ipip-trusted-lb CIDR (or `ipip_trusted_lbs`, or `trusted_lbs`, which IPIP falls \
                 back to)",
            ));
        }
        (true, true) => {
            uses_of_proxy_list.push("IPIP");
            proxy.clone()
        }
    };

    let too_many = [("toa_trusted_lbs", &toa), ("ipip_trusted_lbs", &ipip)];
    for (key, list) in too_many {
        if list.len() > ntlm_tag_common::TRUSTED_PREFIX_ENTRIES as usize {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{} prefixes; at most {} fit the kernel's table",
                    list.len(),
                    ntlm_tag_common::TRUSTED_PREFIX_ENTRIES
                ),
            ));
        }
    }

    let own_lists: [(&'static str, &[ipnet::IpNet], String); 3] = [
        ("trusted_lbs", &proxy, uses_of_proxy_list.join(", ")),
        (
            "toa_trusted_lbs",
            if toa_has_own { &toa } else { &[] },
            "TOA".to_string(),
        ),
        (
            "ipip_trusted_lbs",
            if ipip_has_own { &ipip } else { &[] },
            "IPIP".to_string(),
        ),
    ];
    for (key, list, uses) in own_lists {
        for net in list {
            if let Some(what) = covers_a_whole_family(net) {
                warnings.push(ConfigWarning {
                    key,
                    message: format!(
                        "{net} covers {what}: any such peer may name the client ({uses}) and \
                         choose the address and id the backend sees; list your balancers' \
                         addresses instead"
                    ),
                });
            }
        }
    }
    Ok((TrustLists { proxy, toa, ipip }, warnings))
}
