# The online route to the Switchyard images, for machines that can pull a Rust image:
#
#   docker build --target lb         -t switchyard/lb:local .
#   docker build --target registrar  -t switchyard/registrar:local .
#   docker build --target web-sample -t switchyard/web-sample:local .
#
# scripts/images is the offline route (host-built binaries, no registry). Both put the same
# files in the image (scripts/scratch-image --rootfs), and scripts/images takes each image's
# metadata from the stages below, so this file is the one place it is written.
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lb -p registrar -p web-sample \
 && for b in lb registrar web-sample; do bash scripts/scratch-image --rootfs target/release/$b /out/$b; done

FROM scratch AS lb
COPY --from=build /out/lb/ /
EXPOSE 8080 9090
HEALTHCHECK --interval=2s --timeout=2s --retries=3 --start-period=5s CMD ["/lb", "probe"]
ENTRYPOINT ["/lb"]

FROM scratch AS registrar
COPY --from=build /out/registrar/ /
EXPOSE 9091
HEALTHCHECK --interval=5s --timeout=2s --retries=3 CMD ["/registrar", "probe"]
ENTRYPOINT ["/registrar"]

# No check label: the registrar mirrors this HEALTHCHECK into a Consul TTL check, so swarm
# (which waits for "healthy" before a start-first update stops the old task) and Consul agree
# on when a new task is ready.
FROM scratch AS web-sample
COPY --from=build /out/web-sample/ /
EXPOSE 8000
LABEL switchyard.enable="true" switchyard.port="8000"
HEALTHCHECK --interval=2s --timeout=2s --retries=2 CMD ["/web-sample", "probe"]
ENTRYPOINT ["/web-sample"]
