//! What the kernel says a thread holds: the `Uid`, `Gid`, `Cap*` and `NoNewPrivs` lines of
//! `/proc/self/task/<tid>/status`. Read back after the switch, so that the check does not trust the
//! calls that made it. (Parsed by hand: a dozen lines of `Key:\tvalue`; the `procfs` crate would bring
//! far more than this needs.)
#![forbid(unsafe_code)]

use std::{fs, io, path::PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StatusError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no readable `{field}` line")]
    Field { path: PathBuf, field: &'static str },
}

/// One thread's identity and privileges as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadStatus {
    pub tid: String,
    /// Real, effective, saved and file-system uid.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
}

/// Every thread of this process.
pub fn all_threads() -> Result<Vec<ThreadStatus>, StatusError> {
    let dir = PathBuf::from("/proc/self/task");
    let entries = fs::read_dir(&dir).map_err(|source| StatusError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut threads = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StatusError::Read {
            path: dir.clone(),
            source,
        })?;
        let path = entry.path().join("status");
        let text = fs::read_to_string(&path).map_err(|source| StatusError::Read {
            path: path.clone(),
            source,
        })?;
        let tid = entry.file_name().to_string_lossy().into_owned();
        threads.push(parse(&tid, &text).map_err(|field| StatusError::Field { path, field })?);
    }
    Ok(threads)
}

/// Parses a `status` file; the error names the missing or malformed field.
pub fn parse(tid: &str, text: &str) -> Result<ThreadStatus, &'static str> {
    let value = |field: &'static str| {
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or(field)
    };
    let ids = |field: &'static str| -> Result<Vec<u32>, &'static str> {
        let ids: Result<Vec<u32>, _> = value(field)?.split_whitespace().map(str::parse).collect();
        ids.ok().filter(|ids| ids.len() == 4).ok_or(field)
    };
    let mask = |field: &'static str| u64::from_str_radix(value(field)?, 16).map_err(|_| field);
    Ok(ThreadStatus {
        tid: tid.to_string(),
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        cap_inh: mask("CapInh")?,
        cap_prm: mask("CapPrm")?,
        cap_eff: mask("CapEff")?,
        cap_bnd: mask("CapBnd")?,
        cap_amb: mask("CapAmb")?,
        no_new_privs: match value("NoNewPrivs")? {
            "0" => false,
            "1" => true,
            _ => return Err("NoNewPrivs"),
        },
    })
}

/// `CAP_BPF, CAP_NET_ADMIN` for a mask; bits the `caps` crate has no name for as `cap 41`.
pub fn names(mask: u64) -> String {
    let mut named: Vec<(u8, String)> = caps::all()
        .into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .map(|c| (c.index(), c.to_string()))
        .collect();
    for bit in 0..64u8 {
        if mask & (1 << bit) != 0 && !named.iter().any(|(i, _)| *i == bit) {
            named.push((bit, format!("cap {bit}")));
        }
    }
    named.sort();
    if named.is_empty() {
        return "none".to_string();
    }
    named
        .into_iter()
        .map(|(_, n)| n)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tntlm-tag\nUmask:\t0022\nState:\tS (sleeping)\n\
        Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
        CapInh:\t0000000000000000\nCapPrm:\t0000008000000000\nCapEff:\t0000008000000000\n\
        CapBnd:\t0000008000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t0\n";

    #[test]
    fn reads_ids_capability_sets_and_no_new_privs() {
        let s = parse("7", STATUS).expect("parses");
        assert_eq!(s.uids, vec![65534; 4]);
        assert_eq!(s.gids, vec![65534; 4]);
        assert_eq!(s.cap_prm, 1 << 39);
        assert_eq!(s.cap_eff, 1 << 39);
        assert_eq!(s.cap_inh, 0);
        assert_eq!(s.cap_amb, 0);
        assert!(s.no_new_privs);
    }

    #[test]
    fn a_missing_or_malformed_field_is_named() {
        let without = STATUS.replace("NoNewPrivs:\t1\n", "");
        assert_eq!(parse("7", &without), Err("NoNewPrivs"));
        let bad = STATUS.replace("CapEff:\t0000008000000000", "CapEff:\tzz");
        assert_eq!(parse("7", &bad), Err("CapEff"));
        let short = STATUS.replace("Uid:\t65534\t65534\t65534\t65534", "Uid:\t0");
        assert_eq!(parse("7", &short), Err("Uid"));
    }

    #[test]
    fn names_capabilities_and_unknown_bits() {
        assert_eq!(names(0), "none");
        assert_eq!(names(1 << 39), "CAP_BPF");
        assert_eq!(names((1 << 12) | (1 << 21)), "CAP_NET_ADMIN, CAP_SYS_ADMIN");
        assert_eq!(names(1 << 50), "cap 50");
    }
}
