//! Identity behind L4 load balancers.

use std::{net::SocketAddr, time::Duration};

use ntlm_tag_tests::{
    backends::recording::{Backend, Seen},
    client::get_then_reset,
    gateway::{Gateway, kernel_counter as counter},
    programs::{ToaWritingCgroup, toa_option},
    topology::{SNAT_SOURCE, SnatTopology, Topology},
    wait::scaled,
};

/// The address a client behind the SNAT balancer forges with a TOA option of its own.
const FORGED: &str = "198.19.66.6:4242";

/// curl from client `i` through the balancer, its handshake carrying a TOA option that names
/// [`FORGED`] (the nftables balancer NATs addresses and ports and passes TCP options through);
/// returns the request the backend saw.
fn curl_writing_toa(topo: &SnatTopology, backend: &Backend, i: u8) -> Seen {
    let toa = ToaWritingCgroup::new(toa_option(254, FORGED.parse().expect("addr")));
    let url = format!("http://{}/forge", SnatTopology::vip());
    toa.curl_seen_by(&topo.client, SnatTopology::client_v4(i), &url, backend)
}

/// The backend saw the balancer as the client, and the forged address nowhere.
fn assert_not_forged(seen: &Seen) {
    let forged_ip = FORGED.split(':').next().expect("ip");
    for (name, value) in &seen.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(forged_ip),
            "the forged client reached the backend in {name}: {value}"
        );
    }
    let peer = SnatTopology::snat_peer();
    let id = seen.all("jespa-connection-id").remove(0);
    assert!(id.starts_with(&format!("{peer}/")), "{id}");
    assert_eq!(seen.all("x-forwarded-for"), vec![SNAT_SOURCE.to_string()]);
    assert_eq!(
        seen.all("forwarded"),
        vec![format!("for=\"{peer}\";proto=http")]
    );
}

#[test]
fn a_client_behind_a_balancer_trusted_without_toa_cannot_forge_its_address_with_toa() {
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    // The balancer is trusted (for PROXY protocol), TOA is not configured.
    let trusted = format!("{SNAT_SOURCE}/32");
    let gw = Gateway::new()
        .args(&["--trusted-lb", &trusted])
        .start(&topo.gateway);
    assert_not_forged(&curl_writing_toa(&topo, &backend, 0));
    // TOA is off: the option was not even read.
    let kernel = gw.admin_json("/kernel");
    assert_eq!(counter(&kernel, "toa_accepted"), 0, "{kernel:#}");
    assert_eq!(counter(&kernel, "toa_untrusted"), 0, "{kernel:#}");
}

#[test]
fn with_toa_on_and_the_balancer_trusted_for_it_toa_names_the_client() {
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let trusted = format!("{SNAT_SOURCE}/32");
    let gw = Gateway::new()
        .args(&["--toa-kind", "254", "--toa-trusted-lb", &trusted])
        .start(&topo.gateway);
    let seen = curl_writing_toa(&topo, &backend, 1);
    let id = seen.all("jespa-connection-id").remove(0);
    assert!(id.starts_with(&format!("{FORGED}/")), "{id}");
    assert_eq!(seen.all("x-forwarded-for"), vec!["198.19.66.6".to_string()]);
    assert_eq!(counter(&gw.admin_json("/kernel"), "toa_accepted"), 1);
}

#[test]
fn with_toa_trusted_from_another_list_a_proxy_only_balancers_clients_cannot_forge_it() {
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let proxy_only = format!("{SNAT_SOURCE}/32");
    let gw = Gateway::new()
        .args(&[
            "--trusted-lb",
            &proxy_only,
            "--toa-kind",
            "254",
            "--toa-trusted-lb",
            "198.18.1.200/32",
        ])
        .start(&topo.gateway);
    assert_not_forged(&curl_writing_toa(&topo, &backend, 2));
    let kernel = gw.admin_json("/kernel");
    assert_eq!(counter(&kernel, "toa_untrusted"), 1, "{kernel:#}");
    assert_eq!(counter(&kernel, "toa_accepted"), 0, "{kernel:#}");
}

#[test]
fn two_clients_behind_a_single_port_snat_balancer_get_different_ids() {
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let _gw = Gateway::new().start(&topo.gateway);
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

#[test]
fn a_reload_that_turns_toa_off_stops_believing_it_and_a_bad_trust_list_is_refused() {
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gw.toml");
    let base = format!(
        "listen = [\"{}\"]\nbackends = [\"{}\"]\nebpf = \"required\"\ntrusted_lbs = [\"{SNAT_SOURCE}/32\"]\n",
        Topology::gateway_addr(),
        Topology::backend_addr(),
    );
    std::fs::write(&config, format!("{base}toa_kind = 254\n")).expect("write config");
    let gw = Gateway::from_config(&config).start(&topo.gateway);
    let id = curl_writing_toa(&topo, &backend, 0)
        .all("jespa-connection-id")
        .remove(0);
    assert!(id.starts_with(&format!("{FORGED}/")), "TOA on: {id}");

    // TOA off (toa_kind no longer set): the kernel stops reading the option with the reload.
    std::fs::write(&config, &base).expect("rewrite config");
    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_for_line("configuration reloaded", scaled(Duration::from_secs(5)))
            .is_some(),
        "{:?}",
        gw.log()
    );
    assert_not_forged(&curl_writing_toa(&topo, &backend, 1));

    // A TOA list while TOA is off is refused, naming the key; the running configuration stays.
    std::fs::write(
        &config,
        format!("{base}toa_trusted_lbs = [\"{SNAT_SOURCE}/32\"]\n"),
    )
    .expect("rewrite config");
    gw.signal(libc::SIGHUP);
    let refused = gw
        .wait_for_line("reload refused", scaled(Duration::from_secs(5)))
        .expect("the refusal is logged");
    assert!(refused.contains("toa_trusted_lbs"), "{refused}");
    assert_not_forged(&curl_writing_toa(&topo, &backend, 2));
    let kernel = gw.admin_json("/kernel");
    assert_eq!(counter(&kernel, "toa_accepted"), 1, "{kernel:#}");
}

#[test]
fn a_trust_list_covering_every_address_is_warned_about_at_start_up_naming_its_key() {
    let topo = SnatTopology::new();
    let _backend = Backend::start(&topo.backend, Topology::backend_addr());
    let gw = Gateway::new()
        .args(&[
            "--trusted-lb",
            &format!("{SNAT_SOURCE}/32"),
            "--toa-kind",
            "254",
            "--toa-trusted-lb",
            "0.0.0.0/0",
        ])
        .start(&topo.gateway);
    let warnings: Vec<String> = gw
        .log()
        .into_iter()
        .filter(|l| l.contains("WARN") && l.contains("covers every IPv4 address"))
        .collect();
    assert_eq!(warnings.len(), 1, "{:?}", gw.log());
    assert!(warnings[0].contains("toa_trusted_lbs"), "{}", warnings[0]);
    assert!(warnings[0].contains("0.0.0.0/0"), "{}", warnings[0]);
}
