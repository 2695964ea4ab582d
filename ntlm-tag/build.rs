//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so one binary is all a gateway needs.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=NTLM_TAG_EBPF_OBJECT");
    let object = match env::var_os("NTLM_TAG_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../ntlm-tag-ebpf/target/bpfel-unknown-none/release/ntlm-tag-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nntlm-tag embeds its eBPF object, which has not been built yet ({}).\n\
             Run `cargo xtask build-ebpf` first (or `cargo xtask setup` on a new machine), \
             or point NTLM_TAG_EBPF_OBJECT at a built object.\n\n",
            object.display()
        );
    }
    let object = object.canonicalize().expect("object exists");
    println!("cargo:rustc-env=NTLM_TAG_EBPF_OBJECT={}", object.display());
}
