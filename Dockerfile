# Builds the order-lifecycle binary and ships it on a slim runtime image.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
# A workspace member: cargo loads its manifest even to build the binary.
COPY tests/support tests/support
RUN cargo build --release --locked --bin order-lifecycle

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/order-lifecycle /usr/local/bin/order-lifecycle
USER nobody
ENV OL_HTTP_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["order-lifecycle"]
CMD ["run"]
