# syntax=docker/dockerfile:1
# MLflow tracking server + model registry with the PostgreSQL driver and the S3 client, for
# docker-compose (PostgreSQL + MinIO) and Kubernetes (SQLite on a PVC, or PostgreSQL + S3).
ARG PYTHON_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7:the base is pinned by the PYTHON_IMAGE build argument (python:3.11-slim), which checkov does not expand

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/sh", "-eu", "-c"]
RUN python -m venv /opt/venv
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    /opt/venv/bin/pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="catsdogs-mlflow" \
      org.opencontainers.image.description="MLflow tracking server for catsdogs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow \
    && mkdir -p /mlflow && chown mlflow:mlflow /mlflow
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /mlflow
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000", "--backend-store-uri=sqlite:////mlflow/mlflow.db", "--artifacts-destination=/mlflow/artifacts"]
