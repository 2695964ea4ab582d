//! The cost of ntlm-tag's eBPF programs from the kernel's own accounting: run-time statistics of
//! the programs a process holds (`/proc/PID/fdinfo`, kept while BPF_ENABLE_STATS is on), and the
//! XDP program run on crafted frames with `BPF_PROG_TEST_RUN`.

use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    path::Path,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf, TestRunOptions,
    maps::lpm_trie::{Key, LpmTrie},
    programs::{TestRun as _, Xdp},
};
use ntlm_tag_common::{LOCAL_ADDRS_MAP, TRUSTED_IPIP_MAP, v4_mapped};
use ntlm_tag_tests::packets::{eth, ipv4, tcp};

/// The kernel's BPF run-time statistics, switched on with BPF_ENABLE_STATS for as long as the
/// switch holds its descriptor: they end with this process however it ends, and
/// `kernel.bpf_stats_enabled` is left alone.
pub struct StatsSwitch(Mutex<Option<OwnedFd>>);

impl StatsSwitch {
    pub fn on() -> Result<StatsSwitch> {
        Ok(StatsSwitch(Mutex::new(Some(enable()?))))
    }

    /// Stops the accounting (it adds two clock reads to every program run).
    pub fn pause(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    pub fn resume(&self) -> Result<()> {
        let mut fd = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if fd.is_none() {
            *fd = Some(enable()?);
        }
        Ok(())
    }
}

fn enable() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")
}

/// Run-time statistics of one loaded program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgStat {
    pub id: u32,
    pub kind: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl ProgStat {
    pub fn ns_per_run(&self) -> f64 {
        self.run_time_ns as f64 / self.run_cnt.max(1) as f64
    }
}

/// The programs whose file descriptors `pid` holds, by id.
pub fn prog_stats(pid: u32) -> Vec<ProgStat> {
    let mut by_id = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        if let Some(stat) = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| parse_fdinfo(&t))
        {
            by_id.insert(stat.id, stat);
        }
    }
    by_id.into_values().collect()
}

/// A program's fdinfo (links and maps have no `run_cnt`).
fn parse_fdinfo(text: &str) -> Option<ProgStat> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    let prog_type = field("prog_type")?;
    Some(ProgStat {
        id: u32::try_from(field("prog_id")?).ok()?,
        kind: match prog_type {
            6 => "xdp".to_string(),
            13 => "sock_ops".to_string(),
            other => format!("type {other}"),
        },
        run_cnt: field("run_cnt")?,
        run_time_ns: field("run_time_ns")?,
    })
}

/// What ran between two samples, per program (programs with no runs are left out).
pub fn delta(before: &[ProgStat], after: &[ProgStat]) -> Vec<ProgStat> {
    after
        .iter()
        .map(|a| {
            let b = before
                .iter()
                .find(|b| b.id == a.id)
                .cloned()
                .unwrap_or_default();
            ProgStat {
                run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                ..a.clone()
            }
        })
        .filter(|d| d.run_cnt > 0)
        .collect()
}

/// The XDP program's cost on one kind of frame.
#[derive(Debug, Clone)]
pub struct XdpCase {
    pub name: &'static str,
    /// How it was run: `repeat N` in one BPF_PROG_TEST_RUN, or N single runs.
    pub method: String,
    /// Mean per packet as BPF_PROG_TEST_RUN reports it, statistics off (for single runs this
    /// includes the test harness's clock reads).
    pub test_run_ns: f64,
    /// Mean per run from the kernel's run-time statistics (they add two clock reads per run).
    pub stats_ns: f64,
    /// Per packet: the repeated test run, or for single runs the test-run time less the harness's
    /// own cost (single runs of a plain frame minus its repeated run).
    pub net_ns: f64,
}

const XDP_PROGRAM: &str = "decap_ipip";
const TRUSTED: [u8; 4] = [198, 18, 1, 100];
const UNTRUSTED: [u8; 4] = [198, 18, 9, 9];
const CLIENT: [u8; 4] = [198, 18, 10, 10];
const VIP: [u8; 4] = [198, 18, 20, 1];
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// How a case is run: a frame the program leaves unchanged can be repeated in one call; a
/// decapsulated frame cannot (the kernel reruns the program on the already-changed buffer).
enum Runs {
    Repeat(u32),
    Single(u32),
}

/// Loads `decap_ipip` from the built object and measures it on crafted frames.
pub fn xdp_test_runs(object: &Path, stats: &StatsSwitch) -> Result<Vec<XdpCase>> {
    let mut ebpf =
        Ebpf::load_file(object).with_context(|| format!("cannot load {}", object.display()))?;
    program(&mut ebpf)?
        .load()
        .context("the verifier refused decap_ipip")?;
    let mut trusted: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(ebpf.map_mut(TRUSTED_IPIP_MAP).context("no trust map")?)?;
    trusted.insert(&Key::new(96 + 32, v4_mapped(TRUSTED)), 1, 0)?;
    // The virtual IP is one of "this host's" addresses, as the gateway loads them.
    let mut local: aya::maps::HashMap<_, [u8; 16], u8> =
        aya::maps::HashMap::try_from(ebpf.map_mut(LOCAL_ADDRS_MAP).context("no local map")?)?;
    local.insert(v4_mapped(VIP), 1, 0)?;
    let inner = |flags| ipv4(CLIENT, VIP, 6, 0, &tcp(40001, 8080, flags));
    let cases = [
        (
            "plain TCP segment, not tunnelled (pass)",
            ipv4_frame(inner(ACK)),
            Runs::Repeat(2_000_000),
        ),
        (
            "plain TCP segment, single runs (calibrates the harness)",
            ipv4_frame(inner(ACK)),
            Runs::Single(50_000),
        ),
        (
            "IPIP from an untrusted source (pass untouched)",
            ipv4_frame(ipv4(UNTRUSTED, [198, 18, 1, 1], 4, 0, &inner(SYN))),
            Runs::Repeat(2_000_000),
        ),
        (
            "IPIP SYN from a trusted balancer (decapsulate + record origin)",
            ipv4_frame(ipv4(TRUSTED, [198, 18, 1, 1], 4, 0, &inner(SYN))),
            Runs::Single(50_000),
        ),
        (
            "IPIP ACK from a trusted balancer (decapsulate)",
            ipv4_frame(ipv4(TRUSTED, [198, 18, 1, 1], 4, 0, &inner(ACK))),
            Runs::Single(50_000),
        ),
    ];
    let mut measured = cases
        .into_iter()
        .map(|(name, input, runs)| measure_case(&mut ebpf, stats, name, &input, &runs))
        .collect::<Result<Vec<_>>>()?;
    subtract_harness(&mut measured);
    Ok(measured)
}

/// The harness's cost per single test run: the plain frame run singly minus repeated (cases 1
/// and 0); taken off every single-run case.
fn subtract_harness(cases: &mut [XdpCase]) {
    let harness = (cases[1].test_run_ns - cases[0].test_run_ns).max(0.0);
    for c in cases
        .iter_mut()
        .filter(|c| c.method.ends_with("single runs"))
    {
        c.net_ns = c.test_run_ns - harness;
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(XDP_PROGRAM)
        .context("the object has no decap_ipip")?
        .try_into()?)
}

/// Measures one frame twice: test-run time with the statistics paused, then the statistics.
fn measure_case(
    ebpf: &mut Ebpf,
    stats: &StatsSwitch,
    name: &'static str,
    input: &[u8],
    runs: &Runs,
) -> Result<XdpCase> {
    let program = program(ebpf)?;
    stats.pause();
    let timed = run_case(program, input, runs);
    stats.resume()?;
    let (method, test_run_ns) = timed?;
    let before = program.info()?;
    run_case(program, input, runs)?;
    let after = program.info()?;
    let count = after.run_count().saturating_sub(before.run_count());
    let time = after.run_time().saturating_sub(before.run_time());
    Ok(XdpCase {
        name,
        method,
        test_run_ns,
        net_ns: test_run_ns,
        stats_ns: if count > 0 {
            time.as_nanos() as f64 / count as f64
        } else {
            f64::NAN
        },
    })
}

/// Runs a case; its method and the mean test-run time per packet.
fn run_case(program: &mut Xdp, input: &[u8], runs: &Runs) -> Result<(String, f64)> {
    Ok(match runs {
        Runs::Repeat(n) => (
            format!("repeat {n}"),
            test_run(program, input, *n)?.as_nanos() as f64,
        ),
        Runs::Single(n) => {
            let mut total = Duration::ZERO;
            for _ in 0..*n {
                total += test_run(program, input, 1)?;
            }
            (
                format!("{n} single runs"),
                total.as_nanos() as f64 / f64::from(*n),
            )
        }
    })
}

/// One BPF_PROG_TEST_RUN; the mean time per repetition.
fn test_run(program: &mut Xdp, input: &[u8], repeat: u32) -> Result<Duration> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    ensure!(
        result.return_value == 2,
        "decap_ipip returned {} instead of XDP_PASS",
        result.return_value
    );
    Ok(result.duration)
}

/// An Ethernet frame carrying IPv4 `l3`.
fn ipv4_frame(l3: Vec<u8>) -> Vec<u8> {
    ntlm_tag_tests::packets::frame(eth(0x0800), l3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_program_and_of_a_link() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1055\nprog_type:\t13\nprog_jited:\t1\n\
                    prog_tag:\tabc\nmemlock:\t4096\nprog_id:\t77\nrun_time_ns:\t5000\nrun_cnt:\t100\n";
        let link = "pos:\t0\nlink_type:\tcgroup\nlink_id:\t5\nprog_tag:\tabc\nprog_id:\t77\n";
        let stat = parse_fdinfo(prog).expect("a program");
        assert_eq!(
            (stat.id, stat.kind.as_str(), stat.run_cnt, stat.run_time_ns),
            (77, "sock_ops", 100, 5000)
        );
        assert_eq!(parse_fdinfo(link), None);
        let later = ProgStat {
            run_cnt: 150,
            run_time_ns: 9000,
            ..stat.clone()
        };
        let d = delta(&[stat], &[later]);
        assert_eq!((d[0].run_cnt, d[0].run_time_ns), (50, 4000));
        assert!((d[0].ns_per_run() - 80.0).abs() < 1e-9);
    }

    #[test]
    fn crafted_frames_have_consistent_lengths() {
        let f = ipv4_frame(ipv4(
            TRUSTED,
            VIP,
            4,
            0,
            &ipv4(CLIENT, VIP, 6, 0, &tcp(1, 2, SYN)),
        ));
        assert_eq!(f.len(), 14 + 20 + 20 + 20);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 60);
    }
}
