//! What the runs measured: one [`Measurement`] per system and workload, merged over the rounds
//! into medians with their [`Spread`], and the whole run's [`Results`].

use std::{path::PathBuf, time::Duration};

use super::{
    Proxy, Workload,
    idle::IdleResult,
    kernel::{ProgStat, XdpCase},
};

/// One system under one workload.
pub struct Measurement {
    pub proxy: Proxy,
    pub workload: Workload,
    pub completed: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// utime + stime of the proxy's processes over the measured interval ÷ requests.
    pub cpu_us_per_request: Option<f64>,
    /// The proxy's CPU time ÷ the interval: near 1.0, the proxy's core was the limit; well below,
    /// something else (the load generator, the backend) was.
    pub proxy_busy: Option<f64>,
    /// Over the runs of this system and workload (the fields above are the medians).
    pub rate_spread: Option<Spread>,
    pub cpu_spread: Option<Spread>,
    pub repeats: usize,
    pub errors: u64,
    pub first_error: Option<String>,
    /// ntlm-tag's programs over the measured interval.
    pub bpf: Vec<ProgStat>,
    pub idle: Option<IdleResult>,
    /// `/proc/loadavg` at the end of the run.
    pub load_average: String,
}

/// Minimum, median and maximum of one quantity over repeated runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        // The lower middle for an even count: a value that was measured, not an average.
        let median = v[(v.len() - 1) / 2];
        Some(Spread {
            min: v[0],
            median,
            max: v[v.len() - 1],
        })
    }
}

/// One measurement per system and workload from the rounds' runs: the median run's latencies, the
/// medians of rate and CPU, the errors of all runs, and the spreads.
pub fn merge(samples: Vec<Measurement>) -> Vec<Measurement> {
    let mut keys: Vec<(Proxy, Workload)> = Vec::new();
    for m in &samples {
        if !keys.contains(&(m.proxy, m.workload)) {
            keys.push((m.proxy, m.workload));
        }
    }
    let mut samples: Vec<Option<Measurement>> = samples.into_iter().map(Some).collect();
    keys.into_iter()
        .filter_map(|(proxy, workload)| {
            let mut group: Vec<Measurement> = samples
                .iter_mut()
                .filter(|m| {
                    m.as_ref()
                        .is_some_and(|m| m.proxy == proxy && m.workload == workload)
                })
                .filter_map(Option::take)
                .collect();
            let rates: Vec<f64> = group.iter().map(|m| m.per_second).collect();
            let cpus: Vec<f64> = group.iter().filter_map(|m| m.cpu_us_per_request).collect();
            let rate_spread = Spread::of(&rates);
            let cpu_spread = Spread::of(&cpus);
            let errors = group.iter().map(|m| m.errors).sum();
            let first_error = group.iter().find_map(|m| m.first_error.clone());
            let repeats = group.len();
            group.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
            let mut median = group.swap_remove((repeats.checked_sub(1)?) / 2);
            median.per_second = rate_spread.map_or(median.per_second, |s| s.median);
            median.cpu_us_per_request = cpu_spread.map(|s| s.median);
            median.rate_spread = rate_spread;
            median.cpu_spread = cpu_spread;
            median.errors = errors;
            median.first_error = first_error;
            median.repeats = repeats;
            Some(median)
        })
        .collect()
}

pub struct Results {
    pub runs: Vec<Measurement>,
    pub xdp: Result<Vec<XdpCase>, String>,
    pub perf_report: Option<PathBuf>,
    pub load_after: String,
    pub elapsed: Duration,
}

impl Results {
    pub fn get(&self, proxy: Proxy, workload: Workload) -> Option<&Measurement> {
        self.runs
            .iter()
            .find(|m| m.proxy == proxy && m.workload == workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_measured_values() {
        let s = Spread::of(&[3.0, 1.0, f64::NAN, 2.0, 10.0]).expect("finite values");
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 10.0));
        assert_eq!(Spread::of(&[5.0]).expect("one value").median, 5.0);
        assert!(Spread::of(&[]).is_none());
    }
}
