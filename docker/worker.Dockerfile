# Training and inference workers: torch (CUDA build from PyPI), DeepSpeed, transformers.
# The CUDA *devel* base provides nvcc for DeepSpeed's JIT-compiled ops.
#   docker build -f docker/worker.Dockerfile -t rlhf-worker .
#   docker run --gpus all rlhf-worker                 # a training worker
#   docker run --gpus all rlhf-worker rlhf worker inference
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 RLHF_CACHE_DIR=/data/cache \
    TORCH_EXTENSIONS_DIR=/data/cache/torch_extensions VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ git bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY rlhf_engine ./rlhf_engine
COPY service ./service
COPY workers ./workers
COPY proto ./proto
# torch first, as the Makefile does: on this base PyPI's torch==2.13.0 is the CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir -c constraints.txt grpcio-tools && python service/grpc/build.py \
    && pip install --no-cache-dir -c constraints.txt '.[all]' \
    && useradd --create-home --uid 10001 rlhf && mkdir -p /data && chown rlhf /data
USER rlhf
VOLUME ["/data"]
# `rlhf worker train` runs one job at a time, plus the sweeper; `rlhf worker inference` serves chat.
CMD ["rlhf", "worker", "train"]
