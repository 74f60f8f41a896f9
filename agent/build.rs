//! Embeds the flows path's eBPF object (`agent-ebpf`, built for `bpfel-unknown-none` by
//! `scripts/build-ebpf.sh`) when it has been built; without it the agent runs with flows off
//! and says why.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sre_lab_ebpf)");
    println!("cargo::rerun-if-env-changed=SRE_LAB_EBPF_OBJ");
    let obj = std::env::var_os("SRE_LAB_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../agent-ebpf/target/bpfel-unknown-none/release/flows")
        });
    println!("cargo::rerun-if-changed={}", obj.display());
    if obj.is_file() {
        println!("cargo::rustc-cfg=sre_lab_ebpf");
        println!("cargo::rustc-env=SRE_LAB_EBPF_OBJ={}", obj.display());
    }
}
