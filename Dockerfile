# One image for every pipeline process: `pipeline run <stage>` (one per stage
# Deployment), `pipeline topics create`, `pipeline backfill run ...`.
# Build:  docker build -t iot-pipeline:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: compilers only here, for any dependency without a wheel ----------
FROM ${PYTHON_IMAGE} AS builder

# Pinning Debian package versions breaks on every point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY stages/ stages/
COPY dlq/ dlq/
RUN pip install --no-cache-dir .

# --- runtime: the virtualenv and the config, no build tools --------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="iot-pipeline" \
      org.opencontainers.image.description="Streaming IoT pipeline on Kafka: ingest, parse, enrich, aggregate"

# A fixed numeric UID/GID, so Kubernetes can check runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 pipeline \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin pipeline

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY config/ /app/config/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIPELINE_CONFIG=/app/config/pipeline.yaml

USER 10001:10001
# /metrics, /healthz, /readyz when PIPELINE_METRICS_PORT=9090 (the chart sets it).
EXPOSE 9090
ENTRYPOINT ["pipeline"]
CMD ["--help"]
