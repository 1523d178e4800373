# syntax=docker/dockerfile:1
#
# relay's container images: one image per component, from one build stage.
#
#   docker build --target control-plane -t relay-control-plane:0.1.0 .
#   docker build --target data-plane    -t relay-data-plane:0.1.0 .
#
# These are the names the Helm chart (helm/relay/values.yaml) and k8s/ use. Each image holds its
# component's binary as the entrypoint plus relayctl (for `kubectl exec … relayctl`). The runtime
# base is distroless cc (glibc, libgcc_s, nothing else: no shell, no package manager) running as
# the numeric user 65532 the chart's securityContext names; nothing is written to the root
# filesystem (the data plane writes only its --data-dir volume, both write /tmp when mounted), so
# readOnlyRootFilesystem: true works. TLS roots are compiled in (webpki-roots): no CA bundle needed.
# e2e/tests/image.rs builds the same file tree from the workspace's binaries and checks with ldd
# that they need nothing beyond the base image's libraries.

ARG RUST_VERSION=1.95.0
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
# The slim image has a C compiler (ring, zstd and the bundled SQLite need nothing more; protobufs
# compile with protox, pure Rust; TLS is rustls) but no make, which tikv-jemalloc-sys (the data
# plane's allocator) runs to build jemalloc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p relay-control-plane-bin -p relay-data-plane -p relayctl \
 && mkdir -p /out \
 && cp target/release/relay-control-plane target/release/relay-data-plane target/release/relayctl /out/

FROM ${RUNTIME_IMAGE} AS control-plane
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="relay-control-plane" \
      org.opencontainers.image.description="relay's control plane: accounts, keys, config push, usage (gRPC)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/relay-dev/relay" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/relay-control-plane /usr/local/bin/relay-control-plane
COPY --from=build /out/relayctl /usr/local/bin/relayctl
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/relay-control-plane"]

FROM ${RUNTIME_IMAGE} AS data-plane
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="relay-data-plane" \
      org.opencontainers.image.description="relay's data plane: the Anthropic API proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/relay-dev/relay" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/relay-data-plane /usr/local/bin/relay-data-plane
COPY --from=build /out/relayctl /usr/local/bin/relayctl
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/relay-data-plane"]
