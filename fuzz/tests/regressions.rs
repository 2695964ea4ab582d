//! Replays every seed (`corpus/<target>/`) and every input that once failed a check
//! (`regressions/<target>/`) through the fuzz targets' checks, on the stable toolchain:
//! `cargo test --manifest-path fuzz/Cargo.toml` (`cargo xtask fuzz --build-only` runs it).
//! A fuzzer crash is added here by copying its artifact to `regressions/<target>/` with a name that
//! says what it was, plus a named test below when it needs explaining.

use std::path::{Path, PathBuf};

use ntlm_tag_fuzz::{TARGETS, check, toa_options};

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(target);
    // A target without inputs of this kind has no folder; any other failure to read one is an
    // error, never "nothing to replay".
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", dir.display()),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(dir: &str) -> usize {
    let mut n = 0;
    for target in TARGETS {
        for file in inputs(dir, target) {
            let data = std::fs::read(&file).expect("readable input");
            let outcome = std::panic::catch_unwind(|| check(target, &data));
            assert!(
                outcome.is_ok(),
                "{target}: {} fails its check",
                file.display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn every_target_has_seeds_and_they_pass() {
    for target in TARGETS {
        assert!(
            inputs("corpus", target).len() >= 4,
            "corpus/{target} needs a handful of realistic seeds"
        );
    }
    assert!(replay("corpus") >= 16);
}

/// The regression inputs on record: replaying must find every one of them, so that a moved or
/// deleted folder fails here instead of silently replaying nothing.
const REGRESSION_INPUTS: &[(&str, &str)] = &[
    ("toa_options", "reads-one-past-len"),
    ("toa_options", "reads-port-of-a-2-byte-option"),
    // A spent `Connection: keep-alive` line before one that names a header: the gateway keeps only
    // the later line, so its header map orders the fields as the lines came, minus the spent one.
    ("http1_head", "spent-connection-line-before-a-kept-one"),
    ("http1_response", "spent-connection-line-before-a-kept-one"),
    // A GET whose client framed a chunked body: forwarded chunked, not sent without its body.
    ("http1_forward", "get-with-a-chunked-body"),
    // The id header `+` folds to nothing, as does a client's `-`: that field claims the id too.
    ("header_sanitisation", "an-id-header-that-folds-to-nothing"),
];

#[test]
fn inputs_that_once_failed_pass() {
    for (target, name) in REGRESSION_INPUTS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("regressions")
            .join(target)
            .join(name);
        assert!(
            path.is_file(),
            "regression input {} is missing",
            path.display()
        );
    }
    assert!(replay("regressions") >= REGRESSION_INPUTS.len());
}

/// TOA kind 254 as the only option byte (`len` 1) followed by a byte past `len`: `find_toa` reads
/// `byte(1)` as the option's length. Found by the `toa_options` target in strict mode within a
/// second; input `regressions/toa_options/reads-one-past-len` (`fe 01 00 fe 08`). Fixed: the
/// length byte is read only when it lies within `len`.
#[test]
fn toa_reads_one_past_len() {
    let input = [254u8, 1, 0, 254, 8];
    let decoded = toa_options::Input::decode(&input).expect("decodes");
    let (_, reads) = toa_options::run(&decoded, decoded.bytes.len());
    assert!(
        reads.iter().all(|&i| i < decoded.len),
        "find_toa read indices {reads:?} with len {}",
        decoded.len
    );
}

/// A 2-byte option of the TOA kind at the end of a 2-byte area: `find_toa` reads its port bytes
/// (indices 2 and 3) before checking the option's length. Found by the `toa_options` target in
/// its first seconds; input `regressions/toa_options/reads-port-of-a-2-byte-option`
/// (kind 59, len 2, slice accessor, options `3b 02 04 05 b4 04 02 08`). Fixed: `read_toa` checks
/// the length is 8 or 20 before reading anything.
#[test]
fn toa_reads_the_port_of_a_too_short_option() {
    let input = [59u8, 2, 4, 59, 2, 4, 5, 180, 4, 2, 8];
    let decoded = toa_options::Input::decode(&input).expect("decodes");
    let (_, reads) = toa_options::run(&decoded, decoded.bytes.len());
    assert!(
        reads.iter().all(|&i| i < decoded.len),
        "find_toa read indices {reads:?} with len {}",
        decoded.len
    );
}
