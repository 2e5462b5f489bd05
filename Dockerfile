# tls-relay: outbound smarthost that accepts and delivers mail over TLS only.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TLS_RELAY_CONFIG=/etc/tls-relay/relay.yaml

WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10025 tlsrelay \
    && useradd --system --uid 10025 --gid tlsrelay --home-dir /var/spool/tls-relay --shell /usr/sbin/nologin tlsrelay \
    && mkdir -p /var/spool/tls-relay /etc/tls-relay \
    && chown tlsrelay:tlsrelay /var/spool/tls-relay

# Mount your relay.yaml, tls-policy.yaml, users.yaml, cert.pem and key.pem here.
VOLUME ["/var/spool/tls-relay"]
USER 10025:10025
EXPOSE 587 465
# Ready = listeners bound, spool writable, disk space left (GET /readyz).  Needs
# `metrics: {address: "127.0.0.1:9465"}` in relay.yaml (see README, "Deploying").
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9465/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["tls-relay"]
CMD ["serve"]
