# hookyard as a container image: build in the Rust image, run as a non-root user on a slim base.
#   docker build -t hookyard .
#   docker run -v hookyard-data:/data -e HOOKYARD_SECRET=whsec_... -e HOOKYARD_ADMIN_TOKEN=... hookyard
# The image's config (deploy/container-config.yaml) keeps its queue in /data; mount your own
# file over /etc/hookyard/dispatcher-config.yaml (or a ConfigMap, see deploy/kubernetes/).
FROM rust:1-bookworm AS build
WORKDIR /src
# The manifest names benches and examples, so cargo wants them present even for the binary.
# build.rs stamps `hookyard --version` (the commit reads `unknown` without .git in the context).
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --bin hookyard

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin hookyard \
    && mkdir -p /data /etc/hookyard \
    && chown 10001:10001 /data
COPY --from=build /src/target/release/hookyard /usr/local/bin/hookyard
COPY deploy/container-config.yaml /etc/hookyard/dispatcher-config.yaml
ENV HOOKYARD_CONFIG=/etc/hookyard/dispatcher-config.yaml \
    HOOKYARD_LOG_FORMAT=json
USER 10001:10001
VOLUME /data
# 8080: ingress (the service in the same pod posts events here); 9090: admin, probes, metrics.
EXPOSE 8080 9090
ENTRYPOINT ["hookyard"]
CMD ["serve"]
