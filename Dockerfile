# projector with its example plugins, for docker-compose.yml (`docker compose --profile
# projector up -d`) or on its own:
#   docker build -t projector . && docker run -p 8080:8080 projector
# The image serves on 0.0.0.0:8080 with SQLite in /data and the plugins of /plugins; every
# setting can be given as a PROJECTOR_* variable (see the README's Configuration).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN rustup target add wasm32-wasip2 \
 && cargo build --release --manifest-path plugins/Cargo.toml --target-dir target \
      --target wasm32-wasip2 -p account-balance -p large-withdrawal-alert \
 && mkdir -p /out/plugins \
 && cp target/wasm32-wasip2/release/account_balance.wasm /out/plugins/account-balance.wasm \
 && cp target/wasm32-wasip2/release/large_withdrawal_alert.wasm \
      /out/plugins/large-withdrawal-alert.wasm \
 && cargo build --release -p projector \
 && cp target/release/projector /out/projector

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/projector /usr/local/bin/projector
COPY --from=build /out/plugins /plugins
ENV PROJECTOR_LISTEN=0.0.0.0:8080 \
    PROJECTOR_DATA_DIR=/data \
    PROJECTOR_PLUGINS=/plugins
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["projector"]
CMD ["serve"]
