# gitfleet server image. Build: docker build -t gitfleet .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
# Built into the binary: the status page's stylesheet and script, the demo's repository.
COPY assets ./assets
COPY example-repo ./example-repo
RUN cargo build --release --locked

FROM debian:bookworm-slim
# git: gix runs git-upload-pack for file:// remotes; openssh-client: ssh:// remotes;
# ca-certificates: https:// remotes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/gitfleet --shell /usr/sbin/nologin gitfleet \
 && mkdir -p /var/lib/gitfleet \
 && chown gitfleet:gitfleet /var/lib/gitfleet
COPY --from=build /src/target/release/gitfleet /usr/local/bin/gitfleet
USER gitfleet
WORKDIR /var/lib/gitfleet
ENV GITFLEET_DATA_DIR=/var/lib/gitfleet \
    GITFLEET_WEB_LISTEN=0.0.0.0:4321
VOLUME ["/var/lib/gitfleet"]
# 4320: OpAMP for collectors; 4321: the API, status and webhooks for people.
EXPOSE 4320 4321
ENTRYPOINT ["gitfleet"]
CMD ["serve"]
