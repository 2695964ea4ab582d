//! Client identity learned in the kernel from trusted balancers: TOA options and IPIP tunnels.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use ntlm_tag_tests::{
    backends::recording::Backend,
    client::Connection,
    gateway::{Gateway, kernel_counter as counter},
    programs::{IpipEncap, ToaWritingCgroup, toa_option},
    topology::{IPIP_VIP, IpipTopology, SNAT_SOURCE, Topology},
    wait::{eventually_within, scaled},
};
use serde_json::Value;

/// A gateway with TOA of `kind` on, trusting `trusted`; one curl from client address `i` whose
/// handshake carries a TOA option naming `named`. Returns the id the backend saw and `/kernel`.
fn curl_with_toa(trusted: &str, kind: &str, named: SocketAddr, i: u8) -> (String, Value) {
    let topo = Topology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new()
        .args(&["--trusted-lb", trusted, "--toa-kind", kind])
        .start(&topo.gateway);
    let toa = ToaWritingCgroup::new(toa_option(kind.parse().expect("kind"), named));
    let id = toa
        .curl_seen_by(
            &topo.client,
            Topology::client_v4(i),
            &Topology::url("/toa"),
            &backend,
        )
        .all("jespa-connection-id")
        .remove(0);
    (id, gw.admin_json("/kernel"))
}

/// The test balancer's TC program, encapsulating towards the gateway's virtual IP.
fn encapsulating(topo: &IpipTopology) -> IpipEncap {
    IpipEncap::attach(
        &topo.balancer,
        "up0",
        IPIP_VIP.parse().expect("vip"),
        SNAT_SOURCE.parse().expect("src"),
        Ipv4Addr::new(198, 18, 1, 1),
    )
}

#[test]
fn toa_from_a_trusted_peer_names_the_client() {
    let named = "198.19.77.7:4321".parse().expect("addr");
    let (id, kernel) = curl_with_toa("198.18.1.0/24", "254", named, 0);
    assert!(id.starts_with("198.19.77.7:4321/"), "{id}");
    assert_eq!(counter(&kernel, "toa_accepted"), 1);
    assert_eq!(counter(&kernel, "toa_untrusted"), 0);
}

#[test]
fn toa_from_an_untrusted_peer_is_ignored_and_counted() {
    let named = "198.19.77.7:4321".parse().expect("addr");
    let (id, kernel) = curl_with_toa("198.18.99.0/24", "254", named, 1);
    assert!(
        id.starts_with(&format!("{}:", Topology::client_v4(1))),
        "the real peer, not the TOA address: {id}"
    );
    assert_eq!(counter(&kernel, "toa_untrusted"), 1);
    assert_eq!(counter(&kernel, "toa_accepted"), 0);
}

#[test]
fn toa_with_kind_200_and_an_ipv6_client() {
    let named = "[fd00:5418:77::7]:4321".parse().expect("addr");
    let (id, kernel) = curl_with_toa("198.18.1.0/24", "200", named, 2);
    assert!(id.starts_with("[fd00:5418:77::7]:4321/"), "{id}");
    assert_eq!(counter(&kernel, "toa_accepted"), 1);
}

#[test]
fn ipip_from_a_trusted_balancer_is_decapsulated_and_names_client_and_balancer() {
    let topo = IpipTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new()
        .listen(IpipTopology::vip())
        .args(&["--trusted-lb", "198.18.1.100/32", "--xdp", "down0"])
        .start(&topo.gateway);
    let kernel = gw.admin_json("/kernel");
    let mode = kernel["xdp"][0]["mode"]
        .as_str()
        .expect("xdp mode")
        .to_string();
    assert!(mode == "native" || mode == "generic", "{kernel:#}");
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains("XDP IPIP decapsulation attached") && l.contains(&mode)),
        "the log says which XDP mode was used"
    );
    let _encap = encapsulating(&topo);
    let admin = gw.admin.clone();
    let (local, row) = topo.client.run(move || async move {
        let src = SocketAddr::new(IpipTopology::client_v4(0), 0);
        let mut conn = Connection::open(Some(src), IpipTopology::vip()).await;
        assert_eq!(conn.get("/ipip", &[]).await.status, 200);
        let local = conn.local;
        let rows: Value = tokio::task::spawn_blocking(move || admin.json("/connections"))
            .await
            .expect("admin");
        let row = rows
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["client"] == local.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("no row for {local}: {rows:#}"));
        conn.close().await;
        (local, row)
    });
    assert_eq!(row["learned_from"], "ipip", "{row:#}");
    assert_eq!(row["balancer"], SNAT_SOURCE);
    let id = backend.seen()[0].all("jespa-connection-id").remove(0);
    assert!(id.starts_with(&format!("{local}/")), "{id}");
    let kernel = gw.admin_json("/kernel");
    assert!(counter(&kernel, "xdp_decapsulated") >= 3, "{kernel:#}");
    assert_eq!(counter(&kernel, "ipip_joined"), 1);
}

#[test]
fn ipip_from_an_untrusted_balancer_is_not_decapsulated() {
    let topo = IpipTopology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new()
        .listen(IpipTopology::vip())
        // The balancer is trusted for PROXY protocol only: tunnels trust their own list.
        .args(&[
            "--trusted-lb",
            "198.18.1.100/32",
            "--ipip-trusted-lb",
            "198.18.99.0/24",
            "--xdp",
            "down0",
        ])
        .start(&topo.gateway);
    let _encap = encapsulating(&topo);
    // The SYN arrives encapsulated from an untrusted source: XDP passes it untouched, and this
    // kernel (no IPIP module) drops it. Start a connect in the background and wait for the counter.
    let client = topo.client.spawn(|| async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(IpipTopology::client_v4(1), 0))
            .expect("bind");
        tokio::time::timeout(
            std::time::Duration::from_secs(3),
            socket.connect(IpipTopology::vip()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    });
    gw.wait_for_kernel("the XDP program to count an untrusted tunnel packet", |k| {
        k["counters"]["xdp_untrusted"].as_u64().unwrap_or(0) >= 1
    });
    assert!(
        !client.join().expect("client thread"),
        "connected through an untrusted tunnel"
    );
    let kernel = gw.admin_json("/kernel");
    assert_eq!(counter(&kernel, "xdp_decapsulated"), 0);
    let client = IpipTopology::client_v4(1).to_string();
    assert!(
        kernel["records"]
            .as_array()
            .expect("records")
            .iter()
            .all(|r| !r["client"].as_str().unwrap_or("").starts_with(&client)),
        "{kernel:#}"
    );
}

#[test]
fn a_virtual_ip_added_after_start_up_is_decapsulated_without_a_reload() {
    let topo = IpipTopology::new();
    // The balancer's virtual IP is not on the gateway yet when it starts.
    topo.gateway
        .ip(&["addr", "del", &format!("{IPIP_VIP}/32"), "dev", "lo"]);
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let listen = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), IpipTopology::vip().port());
    let gw = Gateway::new()
        .listen(listen)
        .args(&["--trusted-lb", "198.18.1.100/32", "--xdp", "down0"])
        .start(&topo.gateway);
    let _encap = encapsulating(&topo);
    // Only a refresh logged after the address was added counts: IPv6 duplicate address detection
    // finishing on the topology's interfaces makes the gateway refresh (and log) before it too.
    let before = gw.log().len();
    ntlm_tag_tests::netns::addr(&topo.gateway, "lo", &format!("{IPIP_VIP}/32"));
    let refreshed = eventually_within(
        "a refresh of this host's addresses after the virtual IP was added",
        scaled(Duration::from_secs(5)),
        || gw.log().split_off(before),
        |new| {
            new.iter()
                .any(|l| l.contains("this host's addresses changed"))
        },
    );
    let line = refreshed
        .iter()
        .find(|l| l.contains("this host's addresses changed"))
        .expect("found above");
    assert!(line.contains("local_addresses"), "{line}");
    let local = topo.client.run(|| async {
        let src = SocketAddr::new(IpipTopology::client_v4(2), 0);
        let mut conn = Connection::open(Some(src), IpipTopology::vip()).await;
        assert_eq!(conn.get("/late-vip", &[]).await.status, 200);
        conn.local
    });
    let id = backend.seen()[0].all("jespa-connection-id").remove(0);
    assert!(id.starts_with(&format!("{local}/")), "{id}");
    let kernel = gw.admin_json("/kernel");
    assert_eq!(counter(&kernel, "ipip_joined"), 1, "{kernel:#}");
    assert_eq!(counter(&kernel, "xdp_inner_not_local"), 0, "{kernel:#}");
}
