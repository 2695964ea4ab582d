//! Identity behind L4 load balancers.

use std::net::SocketAddr;

use ntlm_tag_tests::{
    backend::Backend,
    client::get_then_reset,
    gateway::Gateway,
    topology::{SnatTopology, Topology},
};

#[test]
fn two_clients_behind_a_single_port_snat_balancer_get_different_ids() {
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let listen = Topology::gateway_addr().to_string();
    let backend_addr = Topology::backend_addr().to_string();
    let _gw = Gateway::start(
        &topo.gateway,
        &[
            "--listen",
            &listen,
            "--backend",
            &backend_addr,
            "--ebpf",
            "required",
        ],
    );
    topo.client.run(|| async {
        for i in 0..2 {
            let src = SocketAddr::new(SnatTopology::client_v4(i), 0);
            let path = format!("/client/{i}");
            assert_eq!(get_then_reset(src, SnatTopology::vip(), &path).await, 200);
        }
    });
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    let ids: Vec<String> = seen
        .iter()
        .map(|s| s.all("jespa-connection-id").remove(0))
        .collect();
    let peer = SnatTopology::snat_peer().to_string();
    assert!(
        ids.iter().all(|id| id.starts_with(&format!("{peer}/"))),
        "both clients reach the gateway as {peer}: {ids:?}"
    );
    assert_ne!(
        ids[0], ids[1],
        "the second client must not inherit the first one's id"
    );
}
