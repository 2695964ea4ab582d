//! Embeds the eBPF object, so one binary is all a gateway needs. The object comes from, in order:
//!
//! 1. `NTLM_TAG_EBPF_OBJECT`, a path to a built object (or the fuzz crate's empty placeholder: the
//!    fuzzed parsers never load it);
//! 2. the object `cargo xtask build-ebpf` left in `ntlm-tag-ebpf/target`;
//! 3. otherwise it is built here with aya-build (nightly + bpf-linker, what `cargo xtask setup`
//!    installs), so `cargo install --path ntlm-tag` works from a fresh clone.
//!
//! The first two are never rebuilt here: xtask owns that build (and checks bpf-linker's LLVM).

use std::{
    env,
    path::{Path, PathBuf},
};

/// The eBPF crate's package (and binary) name.
const EBPF_PACKAGE: &str = "ntlm-tag-ebpf";

fn main() {
    println!("cargo:rerun-if-env-changed=NTLM_TAG_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_crate = manifest.join("..").join(EBPF_PACKAGE);
    let xtask_built = ebpf_crate
        .join("target/bpfel-unknown-none/release")
        .join(EBPF_PACKAGE);

    let object = if let Some(given) = env::var_os("NTLM_TAG_EBPF_OBJECT") {
        let given = PathBuf::from(given);
        println!("cargo:rerun-if-changed={}", given.display());
        if !given.is_file() {
            panic!(
                "\n\nNTLM_TAG_EBPF_OBJECT names {}, which is not a file. Point it at a built eBPF \
                 object, or unset it to use the one `cargo xtask build-ebpf` builds.\n\n",
                given.display()
            );
        }
        given
    } else if xtask_built.is_file() {
        println!("cargo:rerun-if-changed={}", xtask_built.display());
        xtask_built
    } else {
        build_with_aya(&ebpf_crate)
    };
    let object = object.canonicalize().expect("the object exists");
    println!("cargo:rustc-env=NTLM_TAG_EBPF_OBJECT={}", object.display());
}

/// Builds the eBPF crate with aya-build into `OUT_DIR` and returns the object's path.
///
/// The eBPF crate is a workspace of its own (it targets bpfel-unknown-none with nightly and has
/// its own lock file), not a build-dependency as in the aya template, so aya-build's
/// `cargo build --package ntlm-tag-ebpf` must run from that crate's directory: the child cargo
/// inherits this process's working directory.
fn build_with_aya(ebpf_crate: &Path) -> PathBuf {
    // A new object when the eBPF sources or the types they share with user space change.
    // (`cargo xtask build-ebpf` creating the object later also shows up here, as a change under
    // ntlm-tag-ebpf/, and switches this script to the xtask-built object.)
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_crate.join("..").join("ntlm-tag-common").display()
    );
    let root_dir = ebpf_crate.to_str().expect("the source path is UTF-8");
    env::set_current_dir(ebpf_crate).expect("the eBPF crate's directory exists");
    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        panic!(
            "\n\nbuilding the eBPF object with aya-build failed: {e:#}\n\
             It needs the nightly toolchain with rust-src and a bpf-linker built for that nightly's \
             LLVM: `sudo cargo xtask setup` installs them (`cargo xtask build-ebpf` then says which \
             one is missing). Or point NTLM_TAG_EBPF_OBJECT at a built object.\n\n"
        );
    }
    PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join(EBPF_PACKAGE)
}
