# A small static image of the agent, for the architecture of the machine that builds it
# (x86_64 or aarch64):
#   docker build -t ghcr.io/sre-lab/agent:0.1.0 .
# `installer up` builds it this way for Talos in Docker and pushes it to the lab's registry.
# Pinned: bpf-linker 0.13 below links against this rustc's LLVM (21–23).
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
# The flows path's eBPF programs (agent-ebpf) need rust-src and bpf-linker; bpf-linker is
# linked against rustc's own LLVM (no LLVM package to match). Without them the agent builds
# with flows off (sre_agent_flows_off{reason="not-built"}).
RUN rustup component add rust-src \
 && sysroot="$(rustc --print sysroot)" \
 && libllvm="$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)" \
 && major="$(basename "$libllvm" | sed -E 's/^libLLVM\.so\.([0-9]+)\..*/\1/')" \
 && mkdir -p /opt/bpf-linker-llvm/lib \
 && ln -sf "$libllvm" /opt/bpf-linker-llvm/lib/libLLVM.so \
 && ln -sf "$libllvm" "/opt/bpf-linker-llvm/lib/$(basename "$libllvm")" \
 && LLVM_PREFIX=/opt/bpf-linker-llvm cargo install bpf-linker --version 0.13.0 --locked \
      --no-default-features --features "llvm-$major"
WORKDIR /src
COPY . .
RUN ./scripts/build-ebpf.sh \
 && target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked -p sre-lab-agent --target "$target" \
 && cp "target/$target/release/agent" /agent

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /agent /agent
COPY deploy/base/agent.yml /etc/sre-lab-agent/agent.yml
EXPOSE 9500
ENTRYPOINT ["/agent"]
CMD ["--config=/etc/sre-lab-agent/agent.yml"]
