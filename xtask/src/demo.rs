//! `cargo xtask demo`: the problem and the fix, on a built-in network-namespace topology, with real
//! components: nftables and HAProxy balancers, a TOA-writing balancer, `curl --ntlm` clients, the
//! NTLMv2 test acceptor as two backends, ntlm-tag with eBPF, and, for comparison, the same gateway
//! configured the way nginx is usually configured (`$remote_addr:$remote_port` as the id).
//!
//! ```text
//!  client ns               lb ns                                   gw ns                     be ns
//!  198.18.10.10-13 ──┐     nft: VIP 198.18.10.1:80 → gw:8080        ntlm-tag :8080, :8443(PROXY) acceptor :8081
//!                    ├──   nft: VIP 198.18.10.1:81 → gw:8090        "nginx-style" :8090          acceptor :8082
//!  198.18.11.10 ─────┘     SNAT clients → 198.18.1.100:40000
//!                          HAProxy 198.18.11.1:80 → gw:8443 (PROXY v2)
//!                          TOA client 198.18.1.102 (LVS FULLNAT style)
//! ```

mod epa;
mod lockout;
mod topology;

use std::{net::SocketAddr, time::Instant};

use crate::{
    step,
    sys::interrupts::{self, Live},
};
use anyhow::{Result, ensure};
use ntlm_tag_tests::{
    acceptor::{Acceptor, CurlRun, Keying, curl_ntlm},
    gateway::Gateway,
    haproxy::{Haproxy, HaproxyOptions, SendProxy},
    programs::{ToaWritingCgroup, toa_option},
};

const VIP: &str = "198.18.10.1";
const HAPROXY_FRONT: &str = "198.18.11.1:80";
const GATEWAY: &str = "198.18.1.1";
const SNAT: &str = "198.18.1.100:40000";
const TOA_CLIENT: &str = "198.19.77.7:4321";

use topology::Topology;

fn users() -> Vec<(String, String)> {
    ["alice", "bob", "carol", "dave"]
        .iter()
        .map(|u| (u.to_string(), format!("{u}-Pa55!")))
        .collect()
}

/// One row of the login table.
struct Row {
    client: String,
    socket_saw: String,
    learned: String,
    id: String,
    backend: String,
    user: String,
}

struct Demo {
    topo: Topology,
    acceptors: Vec<Acceptor>,
    gateway: Gateway,
    nginx_style: Gateway,
    _haproxy: Haproxy,
    toa: ToaWritingCgroup,
    _config: tempfile::TempDir,
}

impl Demo {
    fn start() -> Result<Demo> {
        let topo = Topology::new()?;
        let acceptors: Vec<Acceptor> = [8081, 8082]
            .iter()
            .map(|port| {
                Acceptor::start(
                    &topo.be,
                    SocketAddr::new("198.18.2.2".parse().expect("ip"), *port),
                    &users(),
                    Keying::Header,
                )
            })
            .collect();
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("ntlm-tag.toml");
        std::fs::write(
            &config,
            format!(
                "listen = [\"{GATEWAY}:8080\", {{ address = \"{GATEWAY}:8443\", proxy_protocol = true }}]\n\
                 backends = [\"198.18.2.2:8081\", \"198.18.2.2:8082\"]\n\
                 trusted_lbs = [\"198.18.1.100/32\"]\n\
                 toa_kind = 254\n\
                 toa_trusted_lbs = [\"198.18.1.102/32\"]\n\
                 ebpf = \"required\"\n\
                 show_full_ids = true\n"
            ),
        )?;
        let config = config.to_string_lossy().into_owned();
        let gateway = Gateway::start(&topo.gw, &["--config", &config]);
        // The usual recipe, for comparison: the id is the peer's ip:port (what nginx's
        // `$remote_addr:$remote_port` gives), no eBPF.
        let nginx_style = Gateway::start(
            &topo.gw,
            &[
                "--listen",
                &format!("{GATEWAY}:8090"),
                "--backend",
                "198.18.2.2:8081",
                "--ebpf",
                "off",
                "--admin",
                "127.0.0.1:9181",
                "--config",
                &write_reusable_config(dir.path())?,
            ],
        );
        let haproxy = Haproxy::start(
            &topo.lb,
            HaproxyOptions::new(
                HAPROXY_FRONT.parse()?,
                format!("{GATEWAY}:8443").parse()?,
                SendProxy::V2,
            ),
        );
        let toa = ToaWritingCgroup::new(toa_option(254, TOA_CLIENT.parse()?));
        Ok(Demo {
            topo,
            acceptors,
            gateway,
            nginx_style,
            _haproxy: haproxy,
            toa,
            _config: dir,
        })
    }

    fn curl(&self, source: &str, user: &str, url: &str) -> CurlRun {
        let password = format!("{user}-Pa55!");
        curl_ntlm(
            &self.topo.client,
            source.parse().expect("ip"),
            user,
            &password,
            &[url.to_string()],
            &[],
        )
    }

    /// The acceptor's record of the request that authenticated `user` last: (id, backend).
    fn backend_view(&self, user: &str) -> Option<(String, String)> {
        self.acceptors
            .iter()
            .flat_map(|a| {
                a.requests()
                    .into_iter()
                    .map(move |r| (a.addr.to_string(), r))
            })
            .filter(|(_, r)| r["user"] == user && r["status"] == 200)
            .map(|(backend, r)| (r["conn_id"].as_str().unwrap_or("").to_string(), backend))
            .next_back()
    }

    /// The gateway's own view of the connection with `id`: (peer, learned_from).
    fn gateway_view(&self, id: &str) -> (String, String) {
        let line = self
            .gateway
            .log()
            .into_iter()
            .rev()
            // The demo's gateway runs with `show_full_ids = true` (it says so), so its connection
            // lines carry the full id next to the hash.
            .find(|l| l.contains("client connection") && l.contains(&format!("conn_id={id}")))
            .unwrap_or_default();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap_or("?")
                .trim_matches('"')
                .to_string()
        };
        (field("peer"), field("learned_from"))
    }

    fn row(&self, client: &str, user: &str, run: &CurlRun) -> Row {
        let (id, backend) = self.backend_view(user).unwrap_or_default();
        let (peer, learned) = self.gateway_view(&id);
        Row {
            client: client.to_string(),
            socket_saw: peer,
            learned,
            id,
            backend,
            user: run.users().first().cloned().unwrap_or_else(|| "-".into()),
        }
    }
}

fn write_reusable_config(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("nginx-style.toml");
    std::fs::write(
        &path,
        "id_template = \"{client_ip}:{client_port}\"\nallow_reusable_ids = true\n",
    )?;
    Ok(path.to_string_lossy().into_owned())
}

pub fn run(keep: bool) -> Result<()> {
    // On Ctrl-C or SIGTERM, this process's namespaces and children go: the normal drop guards
    // do not run when a signal ends the process.
    let _harness = interrupts::track(Live::Harness(std::process::id()));
    interrupts::install("cleaning up")?;
    ntlm_tag_tests::gateway::set_echo(std::env::var_os("DEMO_VERBOSE").is_some());
    let started = Instant::now();
    step(
        "building the topology: clients → nftables SNAT / HAProxy (PROXY v2) / TOA balancers → ntlm-tag (eBPF) → 2 NTLM backends",
    );
    let demo = Demo::start()?;
    let url = |port: u16| format!("http://{VIP}:{port}/");

    step(
        "real `curl --ntlm` logins (the gateway runs with show_full_ids = true so that this table can \
         show ids; by default logs and the admin table show only keyed hashes of them)",
    );
    let mut rows = Vec::new();
    let run = demo.curl("198.18.10.10", "alice", &url(80));
    rows.push(demo.row("alice 198.18.10.10 via NAT", "alice", &run));
    let run = demo.curl("198.18.10.11", "bob", &url(80));
    rows.push(demo.row("bob 198.18.10.11 via NAT", "bob", &run));
    let run = demo.curl("198.18.11.10", "carol", &format!("http://{HAPROXY_FRONT}/"));
    rows.push(demo.row("carol 198.18.11.10 via HAProxy", "carol", &run));
    let toa_run = demo.toa.run(
        &demo.topo.lb,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--ntlm",
            "-u",
            "dave:dave-Pa55!",
            "--interface",
            "198.18.1.102",
            &format!("http://{GATEWAY}:8080/"),
        ],
    );
    let toa_run = CurlRun {
        success: true,
        stdout: toa_run,
        stderr: String::new(),
    };
    rows.push(demo.row(&format!("dave {TOA_CLIENT} via TOA"), "dave", &toa_run));
    print_logins(&rows);

    step("the classic attack: mallory (no credentials) arrives on the ip:port alice just used");
    let attack = |port: u16| -> Result<(String, String)> {
        let victim = demo.curl("198.18.10.12", "alice", &url(port));
        ensure!(
            victim.users() == ["alice"],
            "alice could not log in: {}",
            victim.stderr
        );
        let out = demo
            .topo
            .client
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--interface",
                "198.18.10.13",
                "-w",
                "\n%{http_code}",
            ])
            .arg(url(port))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text.lines().last().unwrap_or("").to_string();
        let user = text
            .lines()
            .find_map(|l| l.strip_prefix("user="))
            .unwrap_or("-")
            .to_string();
        Ok((status, user))
    };
    let (nginx_status, nginx_user) = attack(81)?;
    let (tag_status, tag_user) = attack(80)?;
    let nginx_ids = ids_seen(&demo.acceptors, |id| !id.contains('/'));
    println!();
    println!(
        "{:<34} {:<60} {:<8} MALLORY IS SEEN AS",
        "GATEWAY", "ID SENT FOR MALLORY", "STATUS"
    );
    println!(
        "{:<34} {:<60} {:<8} {}",
        "$remote_addr:$remote_port style",
        nginx_ids.last().cloned().unwrap_or_default(),
        nginx_status,
        if nginx_user == "alice" {
            "alice  <-- hijacked alice's session".to_string()
        } else {
            nginx_user.clone()
        }
    );
    let tag_ids = ids_seen(&demo.acceptors, |id| id.starts_with(SNAT));
    println!(
        "{:<34} {:<60} {:<8} {}",
        "ntlm-tag",
        tag_ids.last().cloned().unwrap_or_default(),
        tag_status,
        if tag_status == "401" {
            "nobody: 401, must authenticate".to_string()
        } else {
            tag_user.clone()
        }
    );
    println!();
    println!(
        "Both of alice's and mallory's connections reached the gateway as {SNAT}. The usual id names \
         only that, so mallory continued alice's NTLM session; ntlm-tag's id adds a token that is never \
         reused, so mallory got a 401."
    );

    step(
        "the lockout guard: a client loops on a stale password (via HAProxy), the same user logs in from elsewhere",
    );
    let lockout = lockout::lockout_scene(&demo);
    lockout::print_lockout(&lockout);

    step(
        "Extended Protection through the gateway: an NTLMv2 login bound to the TLS certificate \
         (pyspnego), to a backend that requires it (bridged, then with another certificate)",
    );
    let epa = epa::run(
        (&demo.topo.lb, &demo.topo.gw, &demo.topo.be),
        &users(),
        ("alice", "alice-Pa55!"),
    )?;
    epa::print(&epa, "alice");

    if keep {
        println!();
        println!("topology kept; poke at it, then press Enter to clean up:");
        println!(
            "  nsenter --net=/run/netns/{} curl --ntlm -u alice:alice-Pa55! http://{VIP}/",
            demo.topo.client.name()
        );
        println!(
            "  {} conns --admin {}",
            ntlm_tag_tests::gateway::binary().display(),
            demo.gateway.admin.arg()
        );
        println!(
            "  nsenter --net=/run/netns/{} nft list ruleset",
            demo.topo.lb.name()
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    step("cleaning up");
    drop(demo.nginx_style);
    drop(demo.gateway);
    step(&format!(
        "demo done in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let logins_ok = rows
        .iter()
        .zip(["alice", "bob", "carol", "dave"])
        .all(|(r, u)| r.user == u);
    let distinct_nat_ids = rows[0].id != rows[1].id && rows[0].socket_saw == rows[1].socket_saw;
    ensure!(logins_ok, "a login did not come back as its own user");
    ensure!(
        distinct_nat_ids,
        "the two NAT clients should share a peer and get different ids"
    );
    ensure!(
        nginx_user == "alice",
        "the $remote_addr:$remote_port gateway should have been hijacked"
    );
    ensure!(
        tag_status == "401",
        "ntlm-tag should have answered 401 to mallory"
    );
    ensure!(
        lockout.looping == ["401", "401", "401", "401", "429", "429"]
            && lockout.type3s_refused == 4,
        "the lockout guard should have stopped the looping client after 4 failures: {:?}, {} Type3s at the backend",
        lockout.looping,
        lockout.type3s_refused
    );
    ensure!(
        lockout.elsewhere == ["carol"],
        "carol should have logged in from another address"
    );
    ensure!(
        epa.bridged == (200, Some("alice".to_string())),
        "the EPA-protected login should have passed the bridging gateway: {:?}",
        epa.bridged
    );
    ensure!(
        epa.mismatched == 401
            && epa
                .diagnostic
                .as_ref()
                .is_some_and(|(cause, _)| cause == "certificate_differs"),
        "the login to a backend with another certificate should have been refused and explained"
    );
    Ok(())
}

/// Connection ids the backends saw, in order, that match `filter`.
fn ids_seen(acceptors: &[Acceptor], filter: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen: Vec<(u64, String)> = Vec::new();
    for a in acceptors {
        for (i, r) in a.requests().iter().enumerate() {
            if let Some(id) = r["conn_id"].as_str().filter(|id| filter(id)) {
                seen.push((i as u64, id.to_string()));
            }
        }
    }
    seen.into_iter().map(|(_, id)| id).collect()
}

fn print_logins(rows: &[Row]) {
    println!();
    println!(
        "{:<36} {:<22} {:<10} {:<60} {:<17} AUTHENTICATED AS",
        "CLIENT", "GATEWAY SOCKET SAW", "LEARNED", "ID SENT UPSTREAM", "BACKEND"
    );
    for r in rows {
        println!(
            "{:<36} {:<22} {:<10} {:<60} {:<17} {}",
            r.client, r.socket_saw, r.learned, r.id, r.backend, r.user
        );
    }
    println!();
}
