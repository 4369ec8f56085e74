# courier's container image: build with cargo, run from a distroless image as non-root.
#
#   docker build -t courier:0.1.0 .
#   docker run --rm -v $PWD/courier.toml:/etc/courier/courier.toml:ro courier:0.1.0 run
#
# The runtime image has no shell and no curl: the HEALTHCHECK runs a static busybox's
# wget, in exec form (docs/deploying.md, "Container image"). Kubernetes uses its own
# probes (deploy/k8s/deployment.yaml) and ignores HEALTHCHECK.

# --- build ------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY tools/courier-bench/Cargo.toml tools/courier-bench/Cargo.toml
COPY benches benches
RUN mkdir -p src tools/courier-bench/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > tools/courier-bench/src/main.rs \
    && cargo build --release --locked --bin courier \
    && rm -rf src tools/courier-bench/src
COPY src src
COPY tools/courier-bench/src tools/courier-bench/src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin courier

# A static busybox for the health check only (the runtime image has no shell).
FROM busybox:1.37-musl AS busybox

# --- runtime ----------------------------------------------------------------------
# glibc, CA certificates, tzdata, user 65532 "nonroot"; nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/courier /usr/local/bin/courier
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
USER 65532:65532
# Admin endpoints on every interface inside the container (probes, scrapes).
ENV COURIER_ADMIN_LISTEN=0.0.0.0:9464 \
    COURIER_CONFIG=/etc/courier/courier.toml
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9464/healthz"]
ENTRYPOINT ["/usr/local/bin/courier"]
CMD ["run"]
