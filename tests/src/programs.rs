//! The test-only eBPF programs (`ntlm-tag-ebpf/src/test_programs.rs`): a client that writes TOA
//! options, and a balancer that encapsulates in IPIP. Built by `cargo xtask build-ebpf`.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{CgroupAttachMode, SchedClassifier, SockOps, TcAttachType, tc},
};

use ntlm_tag_common::{
    TEST_ENCAP_CONFIG_MAP, TEST_ENCAP_PROGRAM, TEST_TOA_OPTION_MAP, TEST_WRITE_TOA_PROGRAM,
};

use crate::{gateway::own_cgroup, netns::NetNs};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Path of a built eBPF object of the workspace.
pub fn object(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ntlm-tag-ebpf/target/bpfel-unknown-none/release")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-ebpf`",
        path.display()
    );
    path
}

/// A TOA option as a balancer writes it: kind, length, port, address.
pub fn toa_option(kind: u8, client: std::net::SocketAddr) -> [u8; 20] {
    let mut o = [0u8; 20];
    o[0] = kind;
    o[2..4].copy_from_slice(&client.port().to_be_bytes());
    match client.ip() {
        std::net::IpAddr::V4(v4) => {
            o[1] = 8;
            o[4..8].copy_from_slice(&v4.octets());
        }
        std::net::IpAddr::V6(v6) => {
            o[1] = 20;
            o[4..20].copy_from_slice(&v6.octets());
        }
    }
    o
}

/// A cgroup whose processes' outgoing connections carry a TOA option on the handshake's final ACK.
/// Removed (programs detached, directory deleted) on drop.
pub struct ToaWritingCgroup {
    path: PathBuf,
    _ebpf: Ebpf,
}

impl ToaWritingCgroup {
    pub fn new(option: [u8; 20]) -> ToaWritingCgroup {
        let path = own_cgroup().expect("cgroup2 mounted").join(format!(
            "ntlm-tag-test.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let mut ebpf =
            Ebpf::load_file(object("ntlm-tag-test-programs")).expect("load test programs");
        let mut options: Array<_, [u8; 20]> = Array::try_from(
            ebpf.map_mut(TEST_TOA_OPTION_MAP)
                .expect(TEST_TOA_OPTION_MAP),
        )
        .expect("array");
        options.set(0, option, 0).expect("set option");
        let program: &mut SockOps = ebpf
            .program_mut(TEST_WRITE_TOA_PROGRAM)
            .expect(TEST_WRITE_TOA_PROGRAM)
            .try_into()
            .expect("sock_ops");
        program.load().expect("load write_toa");
        let dir = std::fs::File::open(&path).expect("open cgroup");
        program
            .attach(&dir, CgroupAttachMode::Single)
            .expect("attach write_toa");
        ToaWritingCgroup { path, _ebpf: ebpf }
    }

    /// One GET of `url` with curl from `source`, in `ns` and inside this cgroup (so its handshake
    /// carries the option); returns the request the backend recorded for it.
    pub fn curl_seen_by(
        &self,
        ns: &NetNs,
        source: std::net::IpAddr,
        url: &str,
        backend: &crate::backends::recording::Backend,
    ) -> crate::backends::recording::Seen {
        let before = backend.seen().len();
        let source = source.to_string();
        let body = self.run(
            ns,
            "curl",
            &["-sS", "--max-time", "10", "--interface", &source, url],
        );
        let seen = backend.seen();
        assert_eq!(seen.len(), before + 1, "curl said {body}");
        seen[before].clone()
    }

    /// Runs `program args...` inside `ns` and inside this cgroup, waits for it, returns stdout.
    pub fn run(&self, ns: &NetNs, program: &str, args: &[&str]) -> String {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} -- \"$@\"",
            self.path.display(),
            ns.path().display()
        );
        let out = Command::new("sh")
            .args(["-c", &script, "sh", program])
            .args(args)
            .output()
            .expect("run in cgroup");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ToaWritingCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The IPIP-encapsulating balancer: a TC egress program on an interface of a namespace. The program
/// lives on a thread inside that namespace (TC attachments are per namespace) until dropped.
pub struct IpipEncap {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IpipEncap {
    /// Encapsulates TCP packets for `vip` leaving `iface` in IPv4 from `outer_src` to `outer_dst`.
    pub fn attach(
        ns: &NetNs,
        iface: &str,
        vip: std::net::Ipv4Addr,
        outer_src: std::net::Ipv4Addr,
        outer_dst: std::net::Ipv4Addr,
    ) -> IpipEncap {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let iface = iface.to_string();
        let thread = ns.spawn(move || async move {
            let attach = || -> Result<Ebpf, String> {
                let mut ebpf =
                    Ebpf::load_file(object("ntlm-tag-test-programs")).map_err(|e| e.to_string())?;
                let mut config: Array<_, [u32; 3]> = Array::try_from(
                    ebpf.map_mut(TEST_ENCAP_CONFIG_MAP)
                        .ok_or("no ENCAP_CONFIG")?,
                )
                .map_err(|e| e.to_string())?;
                let ne = |a: std::net::Ipv4Addr| u32::from_ne_bytes(a.octets());
                config
                    .set(0, [ne(vip), ne(outer_src), ne(outer_dst)], 0)
                    .map_err(|e| e.to_string())?;
                let _ = tc::qdisc_add_clsact(&iface);
                let program: &mut SchedClassifier = ebpf
                    .program_mut(TEST_ENCAP_PROGRAM)
                    .ok_or("no encap_ipip")?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| e.to_string())?;
                program.load().map_err(|e| e.to_string())?;
                program
                    .attach(&iface, TcAttachType::Egress)
                    .map_err(|e| e.to_string())?;
                Ok(ebpf)
            };
            match attach() {
                Ok(ebpf) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.recv();
                    drop(ebpf);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("cannot attach the IPIP encapsulation: {e}"),
            Err(_) => panic!("the IPIP encapsulation thread died"),
        }
        IpipEncap {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for IpipEncap {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
