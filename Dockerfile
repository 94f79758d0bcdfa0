# Runs `gateway serve` with a mounted config and data volume:
#   docker run -p 11112:11112 -v ./gateway.toml:/etc/gateway/gateway.toml:ro \
#              -v gwdata:/var/lib/gateway dicom-gateway
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway && chown gateway /var/lib/gateway

WORKDIR /opt/gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . && rm -rf /root/.cache
COPY config/gateway.example.toml /etc/gateway/gateway.toml

USER gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 11112 9110
# The metrics endpoint must be reachable from outside the container to be scraped.
ENV GATEWAY_METRICS__HOST=0.0.0.0
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
