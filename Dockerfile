# syntax=docker/dockerfile:1.7
# Images of fedmedclip. Lint: `hadolint Dockerfile` (clean; tests/test_dockerfile.py runs it when installed).
#   docker build --target train    -t REGISTRY/fedmedclip-train:TAG    --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   docker build --target serve    -t REGISTRY/fedmedclip-serve:TAG    .
#   docker build --target tracking -t REGISTRY/fedmedclip-tracking:TAG .
#   docker push REGISTRY/fedmedclip-train:TAG    # ... and the others; the pipeline takes the train image as
#                                                # `fedmedclip pipeline compile|submit --base-image REGISTRY/fedmedclip-train:TAG`
# train:    torch + the pipeline stack; the base_image of every Kubeflow component (no pip at pod start). ONE CUDA
#           stack: the CUDA libraries of the PyPI wheels (torch, onnxruntime-gpu[cuda,cudnn]) on a plain Python
#           base; the node's NVIDIA driver does the rest (a CUDA base image would be a second, unused stack).
# serve:    ONNX Runtime GPU + KServe + mlflow-skinny (resolves and downloads the registered model); no torch, no
#           full mlflow, no tritonclient (fedmedclip.preprocess is torch-free on purpose).
# tracking: the MLflow server of infra/training (mlflow[auth] + boto3 + the Postgres driver).
# One rule of the pinned stack: onnxruntime and onnxruntime-gpu write the same package folder, never both.
# Every image runs as uid 10001 (numeric, >= 10000 so it never collides with a host user; Kubernetes can verify
# runAsNonRoot on a number) and writes nothing outside HOME=/tmp and the folders its manifests mount, so it runs
# with a read-only root filesystem (infra/): the code is installed, byte-compiled, owned by root, and Python
# writes no bytecode at run time.
# The local development stack (devstack/: moto S3, a local MLflow, `fedmedclip stack ...`) is never copied.
# Base images: pin them by digest for a reproducible build, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest of `docker buildx imagetools inspect python:3.11-slim-bookworm`>
# (the default is the tag: no digest can be looked up where this file is written; infra/README.md, "checkov").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------------------
# Requirement lists derived from pyproject.toml, so dependency layers stay cached while only code changes.
FROM ${PYTHON_IMAGE} AS reqs
WORKDIR /reqs
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py lists pyproject.toml /reqs

# --------------------------------------------------------------------------------------------------------
# The project's source as the train and serve images install it: what the package is made of, listed once.
FROM scratch AS source
COPY pyproject.toml README.m[d] /src/
COPY fedmedclip /src/fedmedclip
COPY mlops /src/mlops
COPY components /src/components
COPY pipelines /src/pipelines
COPY serving /src/serving

# --------------------------------------------------------------------------------------------------------
# What every image shares. MLFLOW_DISABLE_TELEMETRY / DO_NOT_TRACK: MLflow's client and server send usage
# events to mlflow.org by default; nothing about a hospital's runs leaves the cluster. A pod's log is no
# terminal: MLflow's download bar, redrawn in place, would be one long line there. HOME=/tmp (MLflow's
# client writes there when fetching a registered model; /tmp is an emptyDir in the cluster) is set by each
# image after its last RUN: the build's checks run as root, and importing onnxruntime creates $HOME/.cache,
# which would be left root-owned and closed to uid 10001.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin fedmedclip
WORKDIR /app

# --------------------------------------------------------------------------------------------------------
FROM base AS train
ENV HF_HUB_OFFLINE=1 \
    MPLBACKEND=Agg
# torch first and alone: the PyPI wheel for Linux is the CUDA build (its CUDA libraries come as wheels).
RUN pip install --no-cache-dir torch==2.13.0
COPY constraints.txt ./
COPY --from=reqs /reqs/train.txt /tmp/train.txt
RUN pip install --no-cache-dir -c constraints.txt -r /tmp/train.txt
# The commit only now: a build argument invalidates the cache of every RUN after its declaration.
ARG GIT_COMMIT=unknown
ENV FEDMEDCLIP_GIT_COMMIT=${GIT_COMMIT}
COPY --from=source /src ./
# --no-deps: every dependency is installed above, pinned by constraints.txt.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import torch, kfp, mlflow, onnxruntime, fedmedclip, mlops, components"
ENV HOME=/tmp
USER 10001
ENTRYPOINT ["fedmedclip"]
CMD ["--help"]

# --------------------------------------------------------------------------------------------------------
FROM base AS serve
COPY constraints.txt ./
COPY --from=reqs /reqs/serve.txt /tmp/serve.txt
RUN pip install --no-cache-dir -c constraints.txt -r /tmp/serve.txt
COPY --from=source /src ./
COPY docker/requirements.py ./
# --no-deps: the package's own dependencies include torch; the serving ones are installed above. Then the
# image is checked: no torch, no CPU onnxruntime (it would clobber onnxruntime-gpu's files), no full mlflow.
RUN pip install --no-cache-dir --no-deps . \
    && python requirements.py check-serve
ENV HOME=/tmp
USER 10001
EXPOSE 8080 8081
ENTRYPOINT ["fedmedclip"]
CMD ["serve", "--help"]

# --------------------------------------------------------------------------------------------------------
FROM base AS tracking
COPY constraints.txt ./
# mlflow[auth]: the basic-auth app (`mlflow server --app-name basic-auth`, infra/training) needs Flask-WTF.
RUN pip install --no-cache-dir -c constraints.txt "mlflow[auth]==3.17.2" "boto3==1.44.5" "psycopg2-binary==2.9.13"
ENV HOME=/tmp
USER 10001
EXPOSE 5000
ENTRYPOINT []
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
