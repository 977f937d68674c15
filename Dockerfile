# syntax=docker/dockerfile:1.7
#
# gewe-friend-worker container image.
#
#   docker build -t gewe-friend-worker .
#   docker run --rm gewe-friend-worker check-config
#
# One image serves every subcommand of the contract (`run`, `check-config`,
# `publish`, `demo`, `simulate-gewe`); `run` is the default.
#
# Needs BuildKit (the default builder since Docker 23 and in `docker compose`)
# for the cache mounts below, which keep the cargo registry and target dir
# between builds so that a source change rebuilds only this crate.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- builder ---
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The whole context (see .dockerignore): copying only Cargo.* and src/ would
# break as soon as the manifest names another target (build.rs, benches, ...).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin gewe-friend-worker \
 && install -D -m 0755 target/release/gewe-friend-worker /out/gewe-friend-worker

# ---------------------------------------------------------------- runtime ---
# debian-slim rather than distroless: same glibc as the builder, and it has
# bash, which the HEALTHCHECK below uses instead of curl (nothing else is
# installed but ca-certificates: amqps:// verifies the broker against the
# system trust store; https to GeWe uses certificates built into the binary).
FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gewe \
 && useradd --system --uid 10001 --gid gewe --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin gewe
COPY --from=builder /out/gewe-friend-worker /usr/local/bin/gewe-friend-worker

# Numeric so that Kubernetes' runAsNonRoot can verify it without a runAsUser.
USER 10001:10001
ENV RUST_LOG=info
# Ops endpoint (http.listen): /healthz, /readyz, /metrics.
EXPOSE 8080

# Docker-level health for `docker run` / compose; Kubernetes ignores it and
# uses the probes in deploy/kubernetes/deployment.yaml. No curl in the image:
# bash's /dev/tcp speaks just enough HTTP. It asks /readyz (consuming from the
# broker), since Docker only reports health and never restarts on it. The
# port follows GEWE_WORKER__HTTP__LISTEN when that is set; a worker whose
# listen address is set only in a config file must override this check.
# Containers running `simulate-gewe` override it too (see docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "l=${GEWE_WORKER__HTTP__LISTEN:-0.0.0.0:8080}; exec 3<>/dev/tcp/127.0.0.1/${l##*:} && printf 'GET /readyz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["/usr/local/bin/gewe-friend-worker"]
CMD ["run"]
