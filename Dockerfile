# syntax=docker/dockerfile:1
# ocpp-proxy: OCPP 1.6J gateway. Build: docker build -t ocpp-proxy .
# Run:  docker run -p 19520:19520 -v ./ocpp-proxy.toml:/config/ocpp-proxy.toml:ro \
#         -v ocpp-certs:/certs -v ocpp-data:/data ocpp-proxy
# The install steps below are exercised without Docker by tests/test_install.py.

# --- build: wheels for the proxy and every dependency --------------------------------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxy/ proxy/
# Every dependency at the version constraints.txt pins (the set CI tests), with the PostgreSQL
# driver for [store] url (docs/cluster.md; unused while [store] url is empty).
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt '.[postgres]'

# --- runtime: the wheels installed, nothing else ------------------------------------
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="ocpp-proxy" \
      org.opencontainers.image.description="OCPP 1.6J gateway: byte-exact wallbox/backend relay with local load management" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OCPP_PROXY_HEALTH_URL=http://127.0.0.1:9520/healthz
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "$(ls /wheels/ocpp_proxy-*.whl)[postgres]" \
    && useradd --system --no-log-init --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin ocpp \
    && mkdir -p /config /certs /data \
    && chown ocpp:ocpp /certs /data
COPY deploy/config.example.toml /config/ocpp-proxy.toml
USER 10001:10001
WORKDIR /data
VOLUME ["/config", "/certs", "/data"]
# 19520: wallboxes (OCPP-J over WebSocket, plain and TLS). 9520: /metrics, /healthz,
# /readyz, reachable from outside the container only with [metrics] listen = "0.0.0.0:9520".
EXPOSE 19520 9520
# /healthz fails when the event loop stops running; set OCPP_PROXY_HEALTH_URL if you
# move [metrics] listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['OCPP_PROXY_HEALTH_URL'], timeout=4)"]
# SIGTERM: stop accepting, close every wallbox with 1001, exit 0 within 2 x close_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ocpp-proxy"]
CMD ["run", "--config", "/config/ocpp-proxy.toml"]
