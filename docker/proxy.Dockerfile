# The sidecar image: `weir-proxy` (the proxy, as UID 2102) and `weir-proxy init` (the
# iptables rules, run by the injected weir-init container as root with NET_ADMIN/NET_RAW).
# Build from the repository root:
#   docker build -f docker/proxy.Dockerfile -t ghcr.io/weir-mesh/weir-proxy:0.1.0 .
# The runtime image is Debian slim with only iptables added. Its default backend is nft, which
# needs nf_tables in the node's kernel (every current distribution has it) and no lock file
# (the injected weir-init runs with a read-only root filesystem).

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir-proxy \
    && install -D -m 0755 target/release/weir-proxy /out/weir-proxy

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 2102 weir \
    && useradd --system --uid 2102 --gid 2102 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /out/weir-proxy /usr/local/bin/weir-proxy
USER 2102:2102
EXPOSE 4140 4143 4191
ENTRYPOINT ["/usr/local/bin/weir-proxy"]
