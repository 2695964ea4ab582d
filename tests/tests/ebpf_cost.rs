//! What the kernel programs cost, measured on this machine: a rerunnable measurement, not a check
//! (timings depend on the machine and its load, so nothing here asserts a bound). Run as root after
//! `cargo xtask build-ebpf`, alone on a quiet machine:
//!
//! ```text
//! cargo test -p ntlm-tag-tests --test ebpf_cost -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `NTLM_TAG_COST_ROUNDS` sets the rounds per case (default 5); each case prints the median and the
//! range over the rounds. `NTLM_TAG_COST_OBJECT` measures another build of the object (say, a copy
//! of main's) with the same harness; `NTLM_TAG_COST_CASE` runs only the XDP cases whose name contains
//! it (besides the two plain-frame cases the harness cost comes from), say under `perf record`.
//!
//! - XDP: `decap_ipip` on crafted frames with `BPF_PROG_TEST_RUN`. A frame the program passes
//!   untouched is repeated inside one test run; a decapsulated frame cannot be (the kernel reruns the
//!   program on the changed buffer), so it runs singly and the harness's cost per single run (the
//!   plain frame run singly minus repeated) is taken off, as the bench does.
//! - sock_ops: `track_connections` attached to a cgroup of its own that this process joins for the
//!   measurement; loopback connections with both ends in it (a gateway's accepted and upstream
//!   sockets), timed by the kernel's run-time statistics (BPF_ENABLE_STATS: run_time_ns / run_cnt).
//!
//! One check runs with the other tests: the programs call none of the compiler's memory functions,
//! which on BPF are byte-at-a-time loops (zeroing the 88-byte connection record that way was most of
//! what sock_ops did on a new connection, besides the map update itself).

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use aya::{
    Ebpf, TestRunOptions,
    maps::{
        HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, SockOps, TestRun as _, Xdp},
};
use ntlm_tag_common::{
    COUNTERS_MAP, Counter, LOCAL_ADDRS_MAP, SOCK_OPS_PROGRAM, TRUSTED_IPIP_MAP, XDP_PROGRAM,
    v4_mapped,
};
use ntlm_tag_tests::{
    gateway::cgroup2_mount,
    packets::{
        ACK, CLIENT_V4, CLIENT_V6, ELSEWHERE_V4, SYN, TRUSTED_V4, TRUSTED_V6, UNTRUSTED_V4, VIP_V4,
        VIP_V6, XDP_PASS,
    },
    programs::object,
};

const REPEAT: u32 = 1_000_000;

#[test]
fn the_programs_call_no_byte_at_a_time_memory_functions() {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
    let path = measured_object();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let elf = object::File::parse(&*bytes).expect("an ELF object");
    for section in ["sockops", "xdp"] {
        let calls: Vec<String> = elf
            .section_by_name(section)
            .unwrap_or_else(|| panic!("no {section} section"))
            .relocations()
            .filter_map(|(_, r)| match r.target() {
                RelocationTarget::Symbol(i) => elf.symbol_by_index(i).ok(),
                _ => None,
            })
            .filter_map(|s| s.name().ok().map(str::to_string))
            .filter(|name| ["memset", "memcpy", "memmove", "memcmp"].contains(&name.as_str()))
            .collect();
        assert!(
            calls.is_empty(),
            "the {section} program calls {calls:?}: on BPF these are byte-at-a-time loops; build \
             the value a word at a time instead (see ntlm-tag-ebpf/src/addr.rs)"
        );
    }
}
const SINGLE_RUNS: u32 = 20_000;

fn rounds() -> usize {
    std::env::var("NTLM_TAG_COST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// The object measured: `NTLM_TAG_COST_OBJECT`, or the workspace's build.
fn measured_object() -> PathBuf {
    std::env::var_os("NTLM_TAG_COST_OBJECT").map_or_else(|| object("ntlm-tag-ebpf"), PathBuf::from)
}

fn assert_root() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "BPF_PROG_TEST_RUN and cgroup attachment need root"
    );
}

/// Median, minimum and maximum.
fn summary(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

enum Runs {
    /// One test run repeating the frame.
    Repeat,
    /// Single test runs, one frame each (the frames are cycled: a new connection per run).
    Single,
}

struct XdpCase {
    name: &'static str,
    frames: Vec<Vec<u8>>,
    runs: Runs,
}

#[test]
#[ignore = "a measurement: run by hand on a quiet machine (see the module documentation)"]
fn xdp_ns_per_frame() {
    assert_root();
    let mut ebpf = Ebpf::load_file(measured_object()).expect("load object");
    xdp(&mut ebpf).load().expect("verifier accepts decap_ipip");
    let mut trusted: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(ebpf.map_mut(TRUSTED_IPIP_MAP).expect("map")).expect("trie");
    trusted
        .insert(&Key::new(96 + 32, v4_mapped(TRUSTED_V4)), 1, 0)
        .expect("trust v4");
    trusted
        .insert(&Key::new(64, TRUSTED_V6), 1, 0)
        .expect("trust v6");
    let mut local: HashMap<_, [u8; 16], u8> =
        HashMap::try_from(ebpf.map_mut(LOCAL_ADDRS_MAP).expect("map")).expect("hash");
    local.insert(v4_mapped(VIP_V4), 1, 0).expect("local v4");
    local.insert(VIP_V6, 1, 0).expect("local v6");

    let tcp4 = |port, flags| ipv4(CLIENT_V4, VIP_V4, 6, &tcp(port, 8080, flags));
    let ipip =
        |outer_src, inner: Vec<u8>| eth(0x0800, &ipv4(outer_src, [198, 18, 1, 1], 4, &inner));
    // New connections: a different client port per SYN, as real traffic has.
    let new_syns = (0..4096u16)
        .map(|i| ipip(TRUSTED_V4, tcp4(10_000 + i, SYN)))
        .collect();
    let cases = [
        XdpCase {
            name: "plain TCP segment, not tunnelled",
            frames: vec![eth(0x0800, &tcp4(40001, ACK))],
            runs: Runs::Repeat,
        },
        XdpCase {
            name: "plain TCP segment, single runs (harness)",
            frames: vec![eth(0x0800, &tcp4(40001, ACK))],
            runs: Runs::Single,
        },
        XdpCase {
            name: "IPIP from an untrusted source",
            frames: vec![ipip(UNTRUSTED_V4, tcp4(40001, SYN))],
            runs: Runs::Repeat,
        },
        XdpCase {
            name: "IPIP trusted, inner UDP (not TCP)",
            frames: vec![ipip(
                TRUSTED_V4,
                ipv4(CLIENT_V4, VIP_V4, 17, &[0x9c, 0x41, 0, 53, 0, 8, 0, 0]),
            )],
            runs: Runs::Repeat,
        },
        XdpCase {
            name: "IPIP trusted, inner TCP to another host",
            frames: vec![ipip(
                TRUSTED_V4,
                ipv4(CLIENT_V4, ELSEWHERE_V4, 6, &tcp(40001, 80, SYN)),
            )],
            runs: Runs::Repeat,
        },
        XdpCase {
            name: "IPIP trusted, inner TCP to another host, single runs",
            frames: vec![ipip(
                TRUSTED_V4,
                ipv4(CLIENT_V4, ELSEWHERE_V4, 6, &tcp(40001, 80, SYN)),
            )],
            runs: Runs::Single,
        },
        XdpCase {
            name: "IPIP SYN, same connection every run (bench)",
            frames: vec![ipip(TRUSTED_V4, tcp4(40001, SYN))],
            runs: Runs::Single,
        },
        XdpCase {
            name: "IPIP SYN, a new connection every run",
            frames: new_syns,
            runs: Runs::Single,
        },
        XdpCase {
            name: "IPIP ACK",
            frames: vec![ipip(TRUSTED_V4, tcp4(40001, ACK))],
            runs: Runs::Single,
        },
        XdpCase {
            name: "IPv6-in-IPv6 SYN",
            frames: vec![eth(
                0x86dd,
                &ipv6(
                    TRUSTED_V6,
                    VIP_V6,
                    41,
                    &ipv6(CLIENT_V6, VIP_V6, 6, &tcp(40001, 8080, SYN)),
                ),
            )],
            runs: Runs::Single,
        },
    ];
    let only = std::env::var("NTLM_TAG_COST_CASE").unwrap_or_default();
    let selected = |i: usize, case: &XdpCase| i < 2 || case.name.contains(&only);
    // Raw test-run ns per packet, per case and round; rounds interleave the cases.
    let mut raw = vec![Vec::new(); cases.len()];
    for _ in 0..rounds() {
        for (i, case) in cases.iter().enumerate().filter(|(i, c)| selected(*i, c)) {
            raw[i].push(run_xdp_case(xdp(&mut ebpf), case));
        }
    }
    println!(
        "\nXDP {XDP_PROGRAM}: ns per packet (BPF_PROG_TEST_RUN), median [min–max] of {} rounds",
        rounds()
    );
    for (i, case) in cases.iter().enumerate().filter(|(i, c)| selected(*i, c)) {
        let net: Vec<f64> = match case.runs {
            Runs::Repeat => raw[i].clone(),
            // Per round: this case's single runs less that round's harness cost.
            Runs::Single => raw[i]
                .iter()
                .zip(raw[1].iter().zip(&raw[0]))
                .map(|(t, (single, repeated))| t - (single - repeated).max(0.0))
                .collect(),
        };
        let (median, min, max) = summary(net);
        let method = match case.runs {
            Runs::Repeat => format!("repeat {REPEAT}"),
            Runs::Single => format!("{SINGLE_RUNS} single runs"),
        };
        println!(
            "  {:<45} {:>22}  {median:7.1} [{min:.1}–{max:.1}]",
            case.name, method
        );
    }
}

fn xdp(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(XDP_PROGRAM)
        .expect("decap_ipip")
        .try_into()
        .expect("xdp")
}

/// Mean test-run ns per packet over one round of `case`.
fn run_xdp_case(program: &mut Xdp, case: &XdpCase) -> f64 {
    let run = |program: &mut Xdp, frame: &[u8], repeat: u32| {
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(result.return_value, XDP_PASS, "{}", case.name);
        result.duration
    };
    match case.runs {
        Runs::Repeat => run(program, &case.frames[0], REPEAT).as_nanos() as f64,
        Runs::Single => {
            let mut total = Duration::ZERO;
            for i in 0..SINGLE_RUNS as usize {
                total += run(program, &case.frames[i % case.frames.len()], 1);
            }
            total.as_nanos() as f64 / f64::from(SINGLE_RUNS)
        }
    }
}

const CONNECTIONS_PER_ROUND: usize = 2000;

#[test]
#[ignore = "a measurement: run by hand on a quiet machine (see the module documentation)"]
fn sock_ops_ns_per_connection() {
    assert_root();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let mut ebpf = Ebpf::load_file(measured_object()).expect("load object");
    let cgroup = OwnCgroup::new();
    let program: &mut SockOps = ebpf
        .program_mut(SOCK_OPS_PROGRAM)
        .expect("track_connections")
        .try_into()
        .expect("sock_ops");
    program.load().expect("verifier accepts track_connections");
    let dir = std::fs::File::open(&cgroup.path).expect("open cgroup");
    program
        .attach(&dir, CgroupAttachMode::Single)
        .expect("attach track_connections");
    let joined = cgroup.join();

    let (mut per_run, mut per_connection, mut runs_per_connection) = (vec![], vec![], vec![]);
    for _ in 0..rounds() {
        let program: &mut SockOps = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .expect("track_connections")
            .try_into()
            .expect("sock_ops");
        let before = program.info().expect("info");
        let recorded_before = counter(&ebpf, Counter::Recorded);
        connect_and_close(CONNECTIONS_PER_ROUND);
        let program: &mut SockOps = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .expect("track_connections")
            .try_into()
            .expect("sock_ops");
        let after = program.info().expect("info");
        let runs = after.run_count() - before.run_count();
        let ns = (after.run_time() - before.run_time()).as_nanos() as f64;
        assert_eq!(
            counter(&ebpf, Counter::Recorded) - recorded_before,
            CONNECTIONS_PER_ROUND as u64,
            "every accepted connection was recorded"
        );
        per_run.push(ns / runs as f64);
        per_connection.push(ns / CONNECTIONS_PER_ROUND as f64);
        runs_per_connection.push(runs as f64 / CONNECTIONS_PER_ROUND as f64);
    }
    drop(joined);
    let (m, lo, hi) = summary(per_run);
    let (c, clo, chi) = summary(per_connection);
    let (r, _, _) = summary(runs_per_connection);
    println!(
        "\nsock_ops {SOCK_OPS_PROGRAM}, {CONNECTIONS_PER_ROUND} loopback connections per round, {} rounds \
         (both ends in the cgroup; run-time statistics on):\n  ns per run {m:.1} [{lo:.1}–{hi:.1}]\n  \
         ns per connection {c:.0} [{clo:.0}–{chi:.0}]  ({r:.2} runs per connection)",
        rounds()
    );
}

/// Loopback connections with both ends in this process: connect, accept, one byte each way (the
/// gateway's connections carry data), client closes first, then the server side.
fn connect_and_close(n: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address");
    for _ in 0..n {
        let mut client = TcpStream::connect(addr).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"q").expect("write");
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).expect("read");
        server.write_all(b"a").expect("write");
        client.read_exact(&mut byte).expect("read");
        drop(client);
        // The client's FIN, then ours: the server side goes through CLOSE_WAIT and LAST_ACK.
        assert_eq!(server.read(&mut byte).expect("read EOF"), 0);
        drop(server);
    }
}

fn counter(ebpf: &Ebpf, c: Counter) -> u64 {
    let counters: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(COUNTERS_MAP).expect("map")).expect("array");
    counters
        .get(&(c as u32), 0)
        .map(|v| v.iter().sum())
        .unwrap_or(0)
}

/// A cgroup below this process's own, removed on drop.
struct OwnCgroup {
    path: PathBuf,
    parent: PathBuf,
}

impl OwnCgroup {
    fn new() -> OwnCgroup {
        let mount = cgroup2_mount().expect("cgroup2 mounted");
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
            .unwrap_or_else(|| "/".into());
        let parent = mount.join(own.trim_start_matches('/'));
        let path = parent.join(format!("ntlm-tag-test.{}.cost", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        OwnCgroup { path, parent }
    }

    /// Moves this process into the cgroup until the guard drops (sockets created meanwhile belong
    /// to it for their whole life).
    fn join(&self) -> Joined<'_> {
        move_self(&self.path);
        Joined(self)
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

struct Joined<'a>(&'a OwnCgroup);

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        move_self(&self.0.parent);
    }
}

fn move_self(cgroup: &std::path::Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("join {}: {e}", cgroup.display()));
}

fn eth(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small packet");
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("small packet");
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[next_header, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}
