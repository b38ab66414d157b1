# selftrain trainer + driver image (first version; the Kubernetes issue completes it).
# CUDA PyTorch base; dependencies pinned by constraints.txt (the same file CI installs from).
ARG BASE_IMAGE=pytorch/pytorch:2.15.0-cuda13.2-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MLFLOW_TRACKING_URI=sqlite:////workspace/mlflow.db

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/selftrain
COPY pyproject.toml constraints.txt README.md ./
COPY pipelines ./pipelines
COPY trainers ./trainers
# GPU extras: a CUDA build of faiss replaces faiss-cpu.
RUN python -m pip install -c constraints.txt . \
 && python -m pip uninstall -y faiss-cpu \
 && python -m pip install 'faiss-gpu-cu12>=1.8'

RUN useradd --create-home --uid 10001 selftrain && mkdir -p /workspace && chown selftrain /workspace
USER 10001
WORKDIR /workspace
ENTRYPOINT ["selftrain"]
CMD ["--help"]
