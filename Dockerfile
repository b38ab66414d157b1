# selftrain image: the `selftrain` CLI (the pipeline driver) and the trainers that every stage's
# PyTorchJob runs (`torchrun -m trainers <stage> --spec env:SELFTRAIN_SPEC`).
#
# Build and publish (docs/production.md, "Image"):
#   docker build -t registry.example.com/ml/selftrain:0.1.0 . && docker push registry.example.com/ml/selftrain:0.1.0
#   buildah bud --layers -t registry.example.com/ml/selftrain:0.1.0 . && buildah push registry.example.com/ml/selftrain:0.1.0
#
# BASE_IMAGE: the CUDA PyTorch runtime matching torch in constraints.txt (2.15.0, CUDA 13): CPython 3.11
# (`python` and `pip` first on PATH), glibc >= 2.28. Any base with a Python >= 3.11 and pip first on PATH
# works (tests/k8s/test_image_build.py builds on a local Debian bookworm + Python 3.11 base); torch
# comes from the base when it already has torch==2.15.0, else from the package index.
# The dependency set the image installs is resolved by tests/k8s/test_image_resolve.py for
# resolve-python=3.11 resolve-glibc=2.35 (the pytorch/pytorch runtime images are Ubuntu 22.04).
ARG BASE_IMAGE=pytorch/pytorch:2.15.0-cuda13.2-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_TRACKING_URI=sqlite:////workspace/mlflow.db

# git: DVC versions datasets in a git repository.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/selftrain

# 1. Dependencies only, at the versions of constraints.txt: this layer is rebuilt only when
#    pyproject.toml or constraints.txt change, not on a source change. The list is pyproject's
#    [project] dependencies with faiss-cpu swapped for ${FAISS}.
COPY pyproject.toml constraints.txt ./

# faiss: the CUDA 13 build with cuVS (same CUDA major as torch; an abi3 wheel for CPython >= 3.11 and
# manylinux_2_28 whose nvidia-* requirements agree with constraints.txt). It replaces faiss-cpu (same
# `faiss` module), which the image never installs. --build-arg FAISS=faiss-cpu==1.15.1 for a CPU-only image.
ARG FAISS=faiss-gpu-cuvs==1.15.1
# Extra index for torch, e.g. a CPU-only wheel index; empty: the default index (the CUDA build).
ARG TORCH_INDEX_URL=""
# pip that resolves the set (old pips mis-match faiss-gpu-cuvs' `libcuvs-cu13==26.06.*`); the resolver test uses the same.
ARG PIP_VERSION=26.3
# hadolint ignore=DL3013
RUN python -c 'import sys; assert sys.version_info >= (3, 11), "the image needs CPython >= 3.11: " + sys.version' \
 && python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if re.split(r"[<>=!~; \[]", d)[0] != "faiss-cpu"))' > /tmp/requirements.txt \
 && echo "${FAISS}" >> /tmp/requirements.txt \
 && python -m pip install --no-cache-dir "pip==${PIP_VERSION}" \
 && python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The sources (a code change rebuilds only from here): selftrain itself, without dependencies.
COPY README.md ./
COPY contract ./contract
COPY pipelines ./pipelines
COPY trainers ./trainers
COPY configs ./configs
RUN python -m pip install --no-cache-dir --no-deps . \
 && selftrain --version \
 && python -c 'import faiss, torch, deepspeed, trainers.engine; print("torch", torch.__version__, "faiss", faiss.__version__)'

# Non-root: uid/gid 10001, the user the Helm chart's securityContext runs as.
RUN groupadd --gid 10001 selftrain \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin selftrain \
 && mkdir -p /workspace /data /checkpoints \
 && chown 10001:10001 /workspace /data /checkpoints
USER 10001:10001
WORKDIR /workspace

ENTRYPOINT ["selftrain"]
CMD ["--help"]
