# Training and inference workers: torch (CUDA build from PyPI), DeepSpeed, transformers. The one image
# serves every launch backend: the local one (steps in the worker's container), Slurm (the nodes run it
# through Apptainer or enroot/pyxis; docs/slurm.md) and Kubernetes (the TrainJob's pods run it, sshd and
# OpenMPI included for Kubeflow Trainer's DeepSpeed runtime; docs/kubernetes.md).
# The CUDA *devel* base provides nvcc; DeepSpeed's ops the steps load are built here for the architectures
# in TORCH_CUDA_ARCH_LIST, so no job waits for a JIT build.
#   docker build -f docker/worker.Dockerfile -t rlhf-worker .
#   docker run --gpus all rlhf-worker                 # a training worker
#   docker run --gpus all rlhf-worker rlhf worker inference
# Bases pinned to exact releases; `make lint` runs hadolint on this file (docker/hadolint.yaml).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 RLHF_CACHE_DIR=/data/cache \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# bubblewrap: python graders' sandbox; openssh + openmpi + pdsh: multi-node launchers (hostfile, MPI)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ git bubblewrap \
       openssh-client openssh-server openmpi-bin pdsh \
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
    && useradd --create-home --uid 10001 rlhf && mkdir -p /data /opt/torch_extensions
# the ops a CUDA step loads (CPU Adam for ZeRO-Offload, fused Adam) compiled into DeepSpeed itself for
# TORCH_CUDA_ARCH_LIST, DeepSpeed's documented pre-install (no GPU is needed to build them; the pinned
# version is reinstalled from source against the image's torch and CUDA)
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 \
    pip install --no-cache-dir --no-build-isolation --no-deps --force-reinstall --no-binary deepspeed \
      "$(grep '^deepspeed==' constraints.txt)" \
    && python -c "from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder; \
assert CPUAdamBuilder().is_compatible() and FusedAdamBuilder().is_compatible()" \
    && chown -R 10001 /data /opt/torch_extensions
# a TrainJob's node pods run sshd as this user; the launcher's mpirun reaches them with this client config
COPY --chown=10001 docker/mpi/sshd_config /home/rlhf/.sshd_config
COPY docker/mpi/ssh_config /etc/ssh/ssh_config.d/rlhf-mpi.conf
# no secret is baked in: DATABASE_URL, REDIS_URL, RLHF_INFERENCE_TOKEN come from the environment at run time
USER 10001
VOLUME ["/data"]
# the training worker answers Celery's ping; an inference worker overrides it (`rlhf health inference`)
HEALTHCHECK --interval=30s --timeout=15s --start-period=300s --retries=3 CMD ["rlhf", "health", "worker"]
# `rlhf worker train` runs one job at a time, plus the sweeper; `rlhf worker inference` serves chat.
CMD ["rlhf", "worker", "train"]
