# A small static image of the agent, for the architecture of the machine that builds it
# (x86_64 or aarch64):
#   docker build -t ghcr.io/sre-lab/agent:0.1.0 .
# `installer up` builds it this way for Talos in Docker and pushes it to the lab's registry.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked -p sre-lab-agent --target "$target" \
 && cp "target/$target/release/agent" /agent

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /agent /agent
COPY deploy/base/agent.yml /etc/sre-lab-agent/agent.yml
EXPOSE 9500
ENTRYPOINT ["/agent"]
CMD ["--config=/etc/sre-lab-agent/agent.yml"]
