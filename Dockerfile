# syntax=docker/dockerfile:1
# quotagate: build a wheel, install it into a slim runtime as a non-root user.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY quotagate ./quotagate
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/quotagate --create-home quotagate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Config is mounted here (gateway.yaml, plans.yaml, environments.yaml); the embedded Valkey, used
# when store.url is empty, keeps its append-only files in /var/lib/quotagate/data.
COPY config /etc/quotagate
COPY config /usr/share/quotagate/config
VOLUME ["/etc/quotagate", "/var/lib/quotagate"]
USER quotagate
WORKDIR /var/lib/quotagate
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"
ENTRYPOINT ["quotagate", "serve", "--config", "/etc/quotagate/gateway.yaml"]
