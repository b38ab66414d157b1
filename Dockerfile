# selftrain image: the `selftrain` CLI (the pipeline driver) and the trainers that every stage's
# PyTorchJob runs (`torchrun -m trainers <stage> --spec env:SELFTRAIN_SPEC`).
# CUDA PyTorch base matching torch in constraints.txt (2.15.0, CUDA 13); every Python dependency
# is pinned by constraints.txt, the same file CI installs from.
#   docker build -t <registry>/selftrain:0.1.0 .
ARG BASE_IMAGE=pytorch/pytorch:2.15.0-cuda13.2-cudnn9-runtime
FROM ${BASE_IMAGE}

# CUDA build of faiss for the base image's CUDA major version; it replaces faiss-cpu (same module).
ARG FAISS_GPU=faiss-gpu-cu13-cuvs==1.15.0

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
COPY pyproject.toml constraints.txt README.md ./
COPY pipelines ./pipelines
COPY trainers ./trainers
COPY configs ./configs

# selftrain and its dependencies at the versions of constraints.txt; then the GPU extra: faiss-cpu
# is removed first (both wheels write the `faiss` package), then the CUDA build is installed.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir -c constraints.txt . \
 && python -m pip uninstall -y faiss-cpu \
 && python -m pip install --no-cache-dir -c constraints.txt "${FAISS_GPU}" \
 && selftrain --version

# Non-root: uid/gid 10001, the user the Helm chart's securityContext runs as.
RUN groupadd --gid 10001 selftrain \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin selftrain \
 && mkdir -p /workspace /data /checkpoints \
 && chown 10001:10001 /workspace /data /checkpoints
USER 10001:10001
WORKDIR /workspace

ENTRYPOINT ["selftrain"]
CMD ["--help"]
