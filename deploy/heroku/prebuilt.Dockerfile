# The scaling-service image from a binary compiled on this machine: scripts/build-scaling-image.sh
# stages `scaling-service` (static) and the CA bundle under rootfs/ of the build context.
#
# The runtime stage must stay identical to the one in the repository's Dockerfile (what Heroku
# builds); the image test checks that the two declare the same runtime.

# --- runtime ---
FROM scratch
COPY rootfs/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt WHIST_LISTEN=0.0.0.0:7730
USER 65534:65534
EXPOSE 7730
CMD ["/scaling-service"]
