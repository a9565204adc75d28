# syntax=docker/dockerfile:1
# The raft-elector image: a static (musl) binary alone in an empty image.
#
#   docker build -t raft-elector \
#     --build-arg VERSION="$(cargo pkgid | cut -d'#' -f2)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#
# scripts/check-image proves the final stage without Docker: it builds the
# same static binary from exactly the files .dockerignore lets through and
# runs it in an empty root directory (chroot) as user 65532, as here.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-alpine AS build
# gcc and musl-dev: the C parts of the dependencies (ring) and the crt files.
# hadolint ignore=DL3018
RUN apk add --no-cache gcc musl-dev
WORKDIR /src
COPY . .
# On Alpine the host target is x86_64/aarch64-unknown-linux-musl, which links
# statically by default.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin raft-elector \
    && cp target/release/raft-elector /raft-elector \
    && strip /raft-elector

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="raft-elector" \
      org.opencontainers.image.description="Kubernetes leader-election sidecar: Raft among the replicas, the leader published as a pod label, a LeaderElection status and /is-leader" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /raft-elector /raft-elector
# No shell, no libc, no passwd file: a numeric non-root user.
USER 65532:65532
# 4040: /is-leader, /leader, /events, /healthz, /readyz, /metrics. 4041: Raft peers.
EXPOSE 4040 4041
ENTRYPOINT ["/raft-elector"]
CMD ["--help"]
