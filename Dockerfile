# syntax=docker/dockerfile:1.7
# Images of fedmedclip (build with BuildKit: the requirement lists below use a heredoc).
#   docker build --target train    -t REGISTRY/fedmedclip-train:TAG    --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   docker build --target serve    -t REGISTRY/fedmedclip-serve:TAG    .
#   docker build --target tracking -t REGISTRY/fedmedclip-tracking:TAG .
# train:    CUDA torch + the pipeline stack; the base_image of every Kubeflow component (no pip at pod start).
# serve:    ONNX Runtime GPU + KServe, and no torch (fedmedclip.preprocess is torch-free on purpose).
# tracking: the MLflow server of infra/training (mlflow + boto3 + the Postgres driver).
# One rule from docs/stack.md: onnxruntime and onnxruntime-gpu write the same package folder, never both.
# Every image runs as uid 1000 (numeric, so Kubernetes can verify runAsNonRoot) and writes nothing outside
# HOME=/tmp and the folders its manifests mount, so it runs with a read-only root filesystem (infra/): the
# code is installed, byte-compiled, owned by root, and Python writes no bytecode at run time.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.26

FROM ${UV_IMAGE} AS uv

# --------------------------------------------------------------------------------------------------------
# Requirement lists derived from pyproject.toml, so dependency layers stay cached while only code changes.
FROM ${PYTHON_IMAGE} AS reqs
WORKDIR /reqs
COPY pyproject.toml ./
RUN python - <<'EOF'
import re
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]


def name(req):
    return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()


core = project["dependencies"]
# train: torch is installed first and alone (its own layer), then the rest of the core + pipelines + gpu
train = [r for r in core if name(r) != "torch"] + extras["pipelines"] + extras["gpu"]
# serve: what fedmedclip.preprocess needs from the core (numpy, pillow), plus serving + gpu; never torch
serve = [r for r in core if name(r) in {"numpy", "pillow"}] + extras["serving"] + extras["gpu"]
forbidden = {"torch", "onnxruntime", "transformers"} & {name(r) for r in serve}
assert not forbidden, f"the serving image must not install {forbidden}"
assert "onnxruntime" not in {name(r) for r in train}, "train must use onnxruntime-gpu, not the cpu extra"
Path("train.txt").write_text("\n".join(train) + "\n")
Path("serve.txt").write_text("\n".join(serve) + "\n")
EOF

# --------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS train
ARG GIT_COMMIT=unknown
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    MPLBACKEND=Agg \
    PYTHONDONTWRITEBYTECODE=1 \
    FEDMEDCLIP_GIT_COMMIT=${GIT_COMMIT}
COPY --from=uv /uv /usr/local/bin/uv
# Python 3.11, the version the pinned stack was verified on (docs/stack.md), whatever the CUDA image ships.
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv
# torch first and alone: the PyPI wheel for Linux is the CUDA build (CUDA 13 libraries come as wheels).
RUN pip install torch==2.13.0
WORKDIR /app
COPY constraints.txt ./
COPY --from=reqs /reqs/train.txt /tmp/train.txt
RUN pip install -c constraints.txt -r /tmp/train.txt
COPY pyproject.toml README.m[d] ./
COPY fedmedclip ./fedmedclip
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install -c constraints.txt ".[pipelines,gpu]" \
    && python -c "import torch, kfp, mlflow, onnxruntime, fedmedclip, components"
# Ubuntu 24.04 images already have uid 1000 (`ubuntu`): reuse it rather than fail.
RUN id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --no-create-home fedmedclip
ENV HOME=/tmp
USER 1000
ENTRYPOINT ["fedmedclip"]
CMD ["--help"]

# --------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY constraints.txt ./
COPY --from=reqs /reqs/serve.txt /tmp/serve.txt
RUN pip install -c constraints.txt -r /tmp/serve.txt
COPY pyproject.toml README.m[d] ./
COPY fedmedclip ./fedmedclip
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
# --no-deps: the package's own dependencies include torch; the serving ones are installed above.
RUN pip install --no-deps . \
    && python - <<'EOF'
from importlib.metadata import PackageNotFoundError, distribution

for dist in ("torch", "onnxruntime"):  # the CPU onnxruntime would clobber onnxruntime-gpu's files
    try:
        distribution(dist)
    except PackageNotFoundError:
        continue
    raise SystemExit(f"the serving image must not contain {dist}")
import fedmedclip.preprocess, onnxruntime  # noqa: E401,F401
EOF
RUN useradd --uid 1000 --no-create-home fedmedclip
# HOME: MLflow's client writes there when fetching a registered model; /tmp is an emptyDir in the cluster.
ENV HOME=/tmp
USER 1000
EXPOSE 8080 8081
ENTRYPOINT ["fedmedclip"]
CMD ["serve", "--help"]

# --------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS tracking
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /app
COPY constraints.txt ./
# mlflow[auth]: the basic-auth app (`mlflow server --app-name basic-auth`, infra/training) needs Flask-WTF.
RUN pip install -c constraints.txt "mlflow[auth]==3.17.2" boto3 "psycopg2-binary==2.9.13"
RUN useradd --uid 1000 --no-create-home mlflow
USER 1000
EXPOSE 5000
ENTRYPOINT []
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
