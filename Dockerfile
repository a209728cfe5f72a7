# syntax=docker/dockerfile:1
# quotagate: build a wheel, install it into a slim runtime as a non-root user.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY quotagate ./quotagate
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
# The home is the data volume: the embedded Valkey (used while store.url is empty) keeps its
# append-only files in /var/lib/quotagate/data, written by this user.
RUN useradd --system --uid 10001 --home-dir /var/lib/quotagate --create-home quotagate \
 && install -d -o quotagate -g quotagate -m 0750 /var/lib/quotagate/data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The image's own config (listens on every interface in the container), plans and example
# environments; mount your own /etc/quotagate to change them.
COPY config/plans.yaml config/environments.yaml /etc/quotagate/
COPY deploy/image/gateway.yaml /etc/quotagate/gateway.yaml
VOLUME ["/etc/quotagate", "/var/lib/quotagate"]
USER quotagate
WORKDIR /var/lib/quotagate
# The public port only: the admin listener (9090) is the container's own unless a mounted
# config opens it (docker-compose.yml publishes it on the host's loopback).
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"
ENTRYPOINT ["quotagate", "serve", "--config", "/etc/quotagate/gateway.yaml"]
