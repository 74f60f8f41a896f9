#!/usr/bin/env bash
# Builds the flows path's eBPF programs (agent-ebpf, target bpfel-unknown-none) so that the
# agent embeds them (agent/build.rs). Needs rust-src and bpf-linker: installed here with the
# machine's recipe (../shared/ebpf/install-toolchain.sh) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! bpf-linker --version >/dev/null 2>&1 || [ ! -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library/core" ]; then
  recipe=../shared/ebpf/install-toolchain.sh
  if [ ! -f "$recipe" ]; then
    echo "build-ebpf: bpf-linker or rust-src is missing and $recipe is not here" >&2
    exit 1
  fi
  echo "==> installing the eBPF toolchain (rust-src, bpf-linker)"
  bash "$recipe"
fi
echo "==> building agent-ebpf"
(cd agent-ebpf && RUSTC_BOOTSTRAP=1 cargo build --release --target bpfel-unknown-none -Z build-std=core)
ls -l agent-ebpf/target/bpfel-unknown-none/release/flows
