# A small static image of the agent:
#   docker build -t sre-lab/agent:0.1.0 .
# Built for x86_64 with musl, so the final image holds the binary and CA certificates only.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sre-lab-agent --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/agent /agent

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /agent /agent
COPY deploy/base/agent.yml /etc/sre-lab-agent/agent.yml
EXPOSE 9500
ENTRYPOINT ["/agent"]
CMD ["--config=/etc/sre-lab-agent/agent.yml"]
