# syntax=docker/dockerfile:1
# Training image: `.[train]` (PyTorch CPU, MLflow, ONNX, DVC) and git. Runs `catsdogs train` by default; the
# Kubernetes training Job, the retraining CronJob and `docker compose run train` use it.
#
#   docker build -f docker/train.Dockerfile -t catsdogs-train .
#
# TORCH_INDEX_URL points pip at the CPU-only PyTorch wheels (the default PyPI wheel bundles CUDA, ~5 GB).
ARG PYTHON_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7:the base is pinned by the PYTHON_IMAGE build argument (python:3.11-slim), which checkov does not expand
# checkov:skip=CKV_DOCKER_2:a batch job (catsdogs train) serves nothing a HEALTHCHECK could probe

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" ".[train]"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="catsdogs-train" \
      org.opencontainers.image.description="Cats vs dogs training: PyTorch CPU, MLflow, ONNX export" \
      org.opencontainers.image.licenses="Apache-2.0"
# git: `catsdogs retrain` (the weekly CronJob) clones the repository, commits dvc.lock and pushes it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /work && chown app:app /work
COPY --from=build /opt/venv /opt/venv
COPY params.yaml /work/params.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CATSDOGS_DATA_DIR=/work/data \
    CATSDOGS_RUNS_DIR=/work/runs \
    CATSDOGS_CACHE_DIR=/work/.cache
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["catsdogs"]
CMD ["train"]
