//! The demo's network: a client namespace, a balancer namespace (nftables SNAT, the HAProxy front,
//! the TOA client's address), the gateway's and the backends'.

use anyhow::{Context, Result, ensure};
use ntlm_tag_tests::netns::{NetNs, addr, veth};

use super::{GATEWAY, SNAT, VIP};

/// The namespaces of the demo and what connects them.
pub struct Topology {
    pub client: NetNs,
    pub lb: NetNs,
    pub gw: NetNs,
    pub be: NetNs,
}

impl Topology {
    pub fn new() -> Result<Topology> {
        let client = NetNs::new("democl");
        let lb = NetNs::new("demolb");
        let gw = NetNs::new("demogw");
        let be = NetNs::new("demobe");
        veth(&client, "eth0", &lb, "down0");
        veth(&lb, "up0", &gw, "down0");
        veth(&gw, "up0", &be, "eth0");
        for i in 10..14 {
            addr(&client, "eth0", &format!("198.18.10.{i}/24"));
        }
        addr(&client, "eth0", "198.18.11.10/24");
        addr(&client, "eth0", "198.18.11.11/24");
        client.ip(&["route", "add", "default", "via", VIP]);
        addr(&lb, "down0", "198.18.10.1/24");
        addr(&lb, "down0", "198.18.11.1/24");
        for a in ["198.18.1.100/24", "198.18.1.101/24", "198.18.1.102/24"] {
            addr(&lb, "up0", a);
        }
        addr(&gw, "down0", "198.18.1.1/24");
        addr(&gw, "up0", "198.18.2.1/24");
        addr(&be, "eth0", "198.18.2.2/24");
        let rules = format!(
            "table ip demo_lb {{
               chain pre {{ type nat hook prerouting priority dstnat; policy accept;
                 ip daddr {VIP} tcp dport 80 dnat to {GATEWAY}:8080;
                 ip daddr {VIP} tcp dport 81 dnat to {GATEWAY}:8090; }}
               chain post {{ type nat hook postrouting priority srcnat; policy accept;
                 oifname \"up0\" ip saddr 198.18.10.0/24 tcp dport {{ 8080, 8090 }} snat to {SNAT}; }}
             }}"
        );
        run_with_stdin(lb.command("nft").args(["-f", "-"]), &rules).context("nft rules")?;
        // Forward, and reuse the single SNAT port as soon as a connection is over.
        let status = lb
            .command("sysctl")
            .args([
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.netfilter.nf_conntrack_tcp_timeout_close=0",
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait=0",
            ])
            .status()?;
        ensure!(status.success(), "sysctl in the balancer namespace failed");
        Ok(Topology { client, lb, gw, be })
    }
}

fn run_with_stdin(cmd: &mut std::process::Command, input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
