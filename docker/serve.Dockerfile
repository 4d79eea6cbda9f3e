# syntax=docker/dockerfile:1
# Serving image: FastAPI + ONNX Runtime, `.[serve,postgres]` only (no torch), non-root, read-only-root friendly.
# (`postgres`: psycopg 3, for a feedback store shared by replicas.)
#
#   docker build -f docker/serve.Dockerfile -t catsdogs-serve .                     # model pulled at start
#   docker build -f docker/serve.Dockerfile --build-arg MODEL_URI=models:/catsdogs-classifier@champion \
#     --build-arg MLFLOW_TRACKING_URI=http://mlflow:5000 -t catsdogs-serve:baked .   # model baked in
#
# It serves on 0.0.0.0: run it with CATSDOGS_API_KEYS (or CATSDOGS_API_KEYS_FILE, a mounted secret),
# or CATSDOGS_ALLOW_ANONYMOUS=true on purpose; without either it exits with one line saying so.
#
# Behind a TLS-intercepting proxy, pass its CA bundle as a secret: `--secret id=ca_bundle,src=/path/ca.crt`
# (used only during `pip install`, through PIP_CERT; it never lands in a layer).
ARG PYTHON_IMAGE=python:3.11-slim
# checkov:skip=CKV_DOCKER_7:the base is pinned by the PYTHON_IMAGE build argument (python:3.11-slim), which checkov does not expand

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
# binutils (build stage only) strips the wheels' shared libraries; any version does, and the size
# test checks the result.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends binutils && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Bytecode is not shipped (--no-compile, caches removed), nor are the packages' own test suites, nor
# debug symbols. Only what auditwheel left alone is stripped: the libraries it vendored (*.libs/) or
# patched (they carry an RPATH) break when rewritten ("ELF load command address/offset not page-aligned").
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    /opt/venv/bin/pip install --no-compile ".[serve,postgres]"; \
    if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi; \
    /opt/venv/bin/pip uninstall --yes pip setuptools; \
    find /opt/venv -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +; \
    find /opt/venv -type f -name '*.so*' -not -path '*.libs/*' -exec sh -eu -c 'for lib; do \
      case "$(readelf -d "$lib")" in *RPATH*|*RUNPATH*) ;; *) strip --strip-unneeded "$lib" ;; esac; \
    done' sh {} +

# Optional: bake a model into the image. MODEL_URI is any MLflow artifact URI (models:/name@alias,
# runs:/id/model, s3://...); empty means "pull CATSDOGS_MODEL_URI from the registry at start".
FROM build AS model
ARG MODEL_URI=""
ARG MLFLOW_TRACKING_URI=""
RUN --mount=type=secret,id=ca_bundle,required=false \
    mkdir -p /opt/model; \
    if [ -n "${MODEL_URI}" ]; then \
      MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI}" /opt/venv/bin/python -c \
        "import sys, mlflow; mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path='/opt/model')" \
        "${MODEL_URI}"; \
      touch /opt/model/.baked; \
    fi

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="catsdogs-serve" \
      org.opencontainers.image.description="Cats vs dogs classifier API (FastAPI + ONNX Runtime)" \
      org.opencontainers.image.source="https://github.com/catsdogs/catsdogs" \
      org.opencontainers.image.licenses="Apache-2.0"
# /var/lib/catsdogs: where a volume keeps the feedback store's SQLite file (docker-compose.yml); a new
# named volume takes this owner from the image.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/catsdogs
COPY --from=build /opt/venv /opt/venv
COPY --from=model /opt/model /opt/model
COPY docker/serve-entrypoint.sh /usr/local/bin/catsdogs-serve
# Everything the process writes goes to /tmp (a tmpfs / emptyDir), so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CATSDOGS_HOST=0.0.0.0 \
    CATSDOGS_PORT=8000 \
    CATSDOGS_CACHE_DIR=/tmp/catsdogs-cache \
    MPLCONFIGDIR=/tmp
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CATSDOGS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["catsdogs-serve"]
