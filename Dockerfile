# kabao in a container, in two stages: build with the Rust toolchain, run on a slim Debian.
# The build step is the README's: `cargo build --release --locked --bin kabao`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kabao

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /opt/kabao kabao
COPY --from=build /src/target/release/kabao /usr/local/bin/kabao
COPY data /opt/kabao/data
WORKDIR /opt/kabao
USER kabao
ENV KABAO_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["kabao"]
CMD ["serve"]
