//! `cargo xtask demo`: the problem and the fix, on a built-in network-namespace topology.
//!
//! Two clients reach the gateway through an nftables load balancer that gives them the same source
//! `ip:port`, one after the other. The table shows what the gateway's socket saw, the id ntlm-tag sent
//! upstream, and the id the usual nginx recipe (`$remote_addr:$remote_port`) would have sent.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context, Result};
use ntlm_tag_tests::{
    backend::Backend,
    client::Connection,
    gateway::{Gateway, binary},
    topology::{SnatTopology, Topology},
};

use crate::step;

/// Row of the demo's table.
struct Row {
    client: String,
    socket_saw: String,
    learned: String,
    ntlm_tag_id: String,
    nginx_id: String,
}

pub fn run(keep: bool) -> Result<()> {
    install_interrupt_cleanup()?;
    ntlm_tag_tests::gateway::set_echo(std::env::var_os("DEMO_VERBOSE").is_some());
    let started = Instant::now();
    step(
        "building the topology: 2 clients → nftables SNAT balancer (one source ip:port) → ntlm-tag → backend",
    );
    let topo = SnatTopology::new();
    let backend = Backend::start(&topo.backend, Topology::backend_addr());
    let listen = Topology::gateway_addr().to_string();
    let backend_addr = Topology::backend_addr().to_string();
    step(&format!("starting {} --ebpf required", binary().display()));
    let gateway = Gateway::start(
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

    step("client A connects through the balancer, makes a request and closes");
    step("client B connects through the balancer on the same ip:port right after");
    let locals: Vec<SocketAddr> = topo.client.run(|| async {
        let mut locals = Vec::new();
        for i in 0..2 {
            let src = SocketAddr::new(SnatTopology::client_v4(i), 0);
            let mut conn = Connection::open(Some(src), SnatTopology::vip()).await;
            let r = conn.get(&format!("/demo/{i}"), &[]).await;
            assert_eq!(r.status, 200);
            locals.push(conn.local);
            conn.close_abortively().await;
        }
        locals
    });
    let seen = backend.seen();
    let rows: Vec<Row> = seen
        .iter()
        .zip(["A", "B"])
        .zip(&locals)
        .map(|((s, name), local)| Row {
            client: format!("{name} {local}"),
            socket_saw: SnatTopology::snat_peer().to_string(),
            learned: "kernel record (peer)".to_string(),
            ntlm_tag_id: s.all("jespa-connection-id").join(","),
            nginx_id: SnatTopology::snat_peer().to_string(),
        })
        .collect();
    print_table(&rows);
    let same_nginx = rows.windows(2).all(|w| w[0].nginx_id == w[1].nginx_id);
    let distinct = rows
        .windows(2)
        .all(|w| w[0].ntlm_tag_id != w[1].ntlm_tag_id);
    println!();
    println!(
        "nginx's $remote_addr:$remote_port: {} — client B would continue client A's NTLM session.",
        if same_nginx {
            "THE SAME for A and B"
        } else {
            "different"
        }
    );
    println!(
        "ntlm-tag: {} — B starts its own handshake.",
        if distinct {
            "different ids"
        } else {
            "SAME ids (bug!)"
        }
    );
    if keep {
        println!();
        println!("topology kept; poke at it, then press Enter to clean up:");
        println!(
            "  nsenter --net=/run/netns/{} curl -s http://{}/",
            topo.client.name(),
            SnatTopology::vip()
        );
        println!(
            "  nsenter --net=/run/netns/{} curl -s http://127.0.0.1:9180/connections",
            topo.gateway.name()
        );
        println!(
            "  nsenter --net=/run/netns/{} nft list ruleset",
            topo.balancer.name()
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    step("cleaning up");
    drop(gateway);
    drop(backend);
    drop(topo);
    step(&format!(
        "demo done in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    anyhow::ensure!(
        same_nginx && distinct,
        "the demo did not show what it should"
    );
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<22} {:<22} {:<22} {:<42} {:<22}",
        "CLIENT", "GATEWAY SOCKET SAW", "IDENTITY LEARNED", "NTLM-TAG ID UPSTREAM", "NGINX ID"
    );
    for r in rows {
        println!(
            "{:<22} {:<22} {:<22} {:<42} {:<22}",
            r.client, r.socket_saw, r.learned, r.ntlm_tag_id, r.nginx_id
        );
    }
}

/// On Ctrl-C or SIGTERM, remove this process's namespaces and cgroups before exiting, since the
/// normal drop guards do not run when a signal ends the process.
fn install_interrupt_cleanup() -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("\ninterrupted: cleaning up");
            ntlm_tag_tests::cleanup::remove_everything_of(std::process::id());
            std::process::exit(130);
        }
    });
    Ok(())
}
