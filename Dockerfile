# The gateway in a container. It starts as is (config/docker.toml: SQLite and spool on the volume,
# any caller may C-ECHO and C-STORE, nothing forwarded); a site mounts its own configuration over
# /etc/gateway/gateway.toml. README "Deploying" shows docker run and docker compose.
# BASE: any Debian-like image with Python >= 3.11 and its venv module. Without Docker Hub,
# scripts/docker-base builds gateway-base:bookworm from Debian packages (--build-arg BASE=...).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# The gateway lives in its own virtualenv: Debian's python3 is "externally managed" (PEP 668,
# pip refuses to install into it), and `python` in the HEALTHCHECK is the venv's on every base.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN useradd --system --home-dir /var/lib/gateway --create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/gateway && chown gateway: /var/lib/gateway

WORKDIR /opt/gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python3 -m venv /opt/venv && pip install . && rm -rf /root/.cache
COPY config/docker.toml /etc/gateway/gateway.toml

USER gateway
# Relative paths in a mounted configuration land on the volume, not in the read-only install.
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 11112 9110
# Every `gateway` command finds the configuration without --config (docker exec CONTAINER gateway
# queue). The metrics endpoint listens on every interface whatever a mounted file says: on the
# container's loopback nothing outside could scrape it.
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml GATEWAY_METRICS__HOST=0.0.0.0
# /healthz answers 200 when the database answers and the spool has its minimum free space, 503
# naming the failing check otherwise (an HTTPError: exit 1, unhealthy). The slim image has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_METRICS__PORT', '9110'), timeout=5)"]
# On SIGTERM the gateway stops accepting, lets open associations finish (dicom.shutdown_grace_s,
# 30 s), stops its forwarding and rewriting processes and exits 0. Docker's default of 10 s before
# SIGKILL is too short: run with --stop-timeout 120 (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
