# The controller image. Build from the repository root:
#   docker build -f docker/controller.Dockerfile -t ghcr.io/weir-mesh/weir-controller:0.1.0 .
# Multi-stage: the build stage compiles with the locked dependencies; the runtime image is
# distroless (glibc, CA certificates, no shell, no package manager) and runs as non-root 65532.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir-controller \
    && install -D -m 0755 target/release/weir-controller /out/weir-controller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/weir-controller /usr/local/bin/weir-controller
USER 65532:65532
EXPOSE 8090 9990 8443
ENTRYPOINT ["/usr/local/bin/weir-controller"]
