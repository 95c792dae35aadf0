# The service images, compiled in a Rust builder stage and copied with the CA bundle onto an empty
# base. The binaries are static (glibc linked in), so the images hold nothing else.
#   - the last stage, the default, is the scaling-service: what Heroku builds from heroku.yml;
#   - `--target host-service` is the host agent, for deploy/docker-compose.yml.
#
# The runtime stage below must stay identical to deploy/heroku/prebuilt.Dockerfile, which packages a
# binary compiled on this machine (no registry is reachable here); the image test checks that the
# two declare the same runtime.

FROM rust:1.95-bookworm AS compile
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -p scaling-service -p host-service \
        --bin scaling-service --bin host-service --target x86_64-unknown-linux-gnu \
 && for service in scaling-service host-service; do \
      mkdir -p "/$service/etc/ssl/certs" \
      && cp "target/x86_64-unknown-linux-gnu/release/$service" "/$service/$service" \
      && cp /etc/ssl/certs/ca-certificates.crt "/$service/etc/ssl/certs/"; \
    done

# The host agent drives the Docker engine through its socket and the host's devices, as root.
FROM scratch AS host-service
COPY --from=compile /host-service/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 4678 4679
CMD ["/host-service"]

# --- runtime ---
FROM scratch
COPY --from=compile /scaling-service/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt WHIST_LISTEN=0.0.0.0:7730
USER 65534:65534
EXPOSE 7730
CMD ["/scaling-service"]
