# Multi-stage build of the three fleet binaries (and the fakes for the
# `sim` profile). Build: docker build -t claude-fleet .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p ingress -p worker -p billing-worker -p fleet-tests

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 fleet
WORKDIR /app
COPY --from=build /src/target/release/ingress /src/target/release/worker /src/target/release/billing-worker /src/target/release/fakes /src/target/release/demo /usr/local/bin/
COPY config/ /app/config/
USER fleet
ENV LOG_FORMAT=json
