# syntax=docker/dockerfile:1
#
# halfguard container image: a release build on the official Rust image, copied onto a
# distroless runtime (glibc, libgcc, CA certificates, tzdata, no shell, no package manager),
# running as uid/gid 65532.
#
#   docker build -t halfguard:0.1.0 .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9901:9901 halfguard:0.1.0
#
# Both base images are pinned by tag. For reproducible production builds pin them by digest
# too, without editing this file:
#   docker build --build-arg RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm@sha256:... \
#                --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:... .
# The builder and the runtime are both Debian 12 (bookworm), so the binary's glibc matches.
# deploy/image-check.sh proves the runtime stage below on a machine without a Docker engine.

ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and the compiled dependencies between builds
# (BuildKit, buildah and podman all support them), so a source change rebuilds halfguard
# only. The release profile (thin LTO, one codegen unit) is the one in Cargo.toml.
RUN --mount=type=cache,id=halfguard-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=halfguard-target,target=/src/target \
    cargo build --release --locked --bin halfguard \
 && install -D -m 0755 target/release/halfguard /out/halfguard

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=builder /out/halfguard /usr/local/bin/halfguard
# The sidecar config: public port 8080 -> the service on 127.0.0.1:8081, admin (/healthz,
# /readyz, /metrics) on 0.0.0.0:9901. Mount a ConfigMap or a file over it to change it.
COPY deploy/container/halfguard.toml /etc/halfguard/halfguard.toml
# distroless's "nonroot" user. Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# 8080: the data port (public). 9901: admin HTTP; not for the public.
EXPOSE 8080/tcp 9901/tcp
# SIGTERM: /readyz fails for admin.drain_delay, then halfguard stops accepting, lets
# connections finish for timeouts.drain, aborts the rest and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/halfguard"]
CMD ["run", "-c", "/etc/halfguard/halfguard.toml"]
