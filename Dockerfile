# syntax=docker/dockerfile:1.7
#
# The mmsent consumer image. One Dockerfile, two variants chosen with a build argument:
#
#   docker build --build-arg VARIANT=gpu -t registry.example.com/mmsent:0.1.0-gpu .   # CUDA runtime base
#   docker build --build-arg VARIANT=cpu -t registry.example.com/mmsent:0.1.0-cpu .   # Debian slim base
#
# Both variants run the same Python (3.12) so that the virtual environment built in the `builder` stage is
# copied, unchanged, onto the same interpreter path in the final stage. The builder stage has the compilers;
# the final stage has only the interpreter, the venv (with the packaged model under
# site-packages/mmsent/models/default) and a non-root user. See docs/deployment.md.

ARG VARIANT=gpu
ARG CPU_BASE_IMAGE=python:3.12-slim-bookworm
ARG GPU_BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# Runtime bases: the interpreter and nothing else. Everything below builds on `runtime-${VARIANT}`.
# ---------------------------------------------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS runtime-cpu
ENV BASE_PYTHON=/usr/local/bin/python3

FROM ${GPU_BASE_IMAGE} AS runtime-gpu
# Ubuntu 24.04's python3 is 3.12, the same minor version as the CPU base. Unpinned apt versions: the base
# image tag pins the Ubuntu release, and its security updates should be taken on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV BASE_PYTHON=/usr/bin/python3 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint does not resolve build-argument stage names, so it cannot see that this is a stage, not an
# image from a registry that should carry a tag.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime

# ---------------------------------------------------------------------------------------------------------
# Builder: a venv at /opt/mmsent with torch pinned (as the Makefile pins it) and mmsent installed as a
# regular (non-editable) package, so its model files are inside site-packages.
# ---------------------------------------------------------------------------------------------------------
FROM runtime AS builder
ARG VARIANT
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Empty: the CPU variant takes torch from PyTorch's CPU-only wheel index (a few hundred MB instead of the
# multi-GB CUDA build), the GPU variant from PyPI (whose Linux x86_64 torch is the CUDA build and carries
# its own cuBLAS/cuDNN). Set it to use a mirror or another CUDA build.
ARG TORCH_INDEX_URL=""
# Compilers (and, on Ubuntu, the Python headers that python:slim already has) for any dependency without a
# wheel for this platform; they stay in this stage. Unpinned apt versions for the same reason as above.
# hadolint ignore=DL3008
RUN apt-get update \
    && if [ "${VARIANT}" = "gpu" ]; then headers="python3-dev"; else headers=""; fi \
    && apt-get install -y --no-install-recommends build-essential ${headers:+"$headers"} \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN "${BASE_PYTHON}" -m venv /opt/mmsent \
    && if [ -n "${TORCH_INDEX_URL}" ]; then index="${TORCH_INDEX_URL}"; \
       elif [ "${VARIANT}" = "cpu" ]; then index="https://download.pytorch.org/whl/cpu"; \
       else index="https://pypi.org/simple"; fi \
    && /opt/mmsent/bin/pip install --no-cache-dir --index-url "${index}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /tmp/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY mmsent/ mmsent/
COPY consumer/ consumer/
# The constraints keep the torch build chosen above (a CPU wheel stays a CPU wheel).
RUN /opt/mmsent/bin/pip install --no-cache-dir --constraint /tmp/constraints.txt . \
    && /opt/mmsent/bin/python -c "import mmsent, consumer, schemas; print('mmsent installed')" \
    && find /opt/mmsent -name '__pycache__' -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------------------
# Final image: interpreter + venv + non-root user. No compilers, no pip cache, no source tree.
# ---------------------------------------------------------------------------------------------------------
FROM runtime AS final
ARG VARIANT
LABEL org.opencontainers.image.title="mmsent" \
      org.opencontainers.image.description="Multimodal (caption + image) sentiment consumer for Kafka" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.mmsent.variant="${VARIANT}"
RUN groupadd --system --gid 10001 mmsent \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mmsent
COPY --from=builder /opt/mmsent /opt/mmsent
# Caches point at /tmp, the only writable path when the root filesystem is read-only (Kubernetes mounts an
# emptyDir there). The model ships inside the package, so nothing is ever fetched from a hub.
# MALLOC_ARENA_MAX=2: decoded pixels freed on decode threads go back to two arenas, not glibc's 8 per core
# (scripts/decode_memory.py: 32 worst-case images +1.0 GiB with it, +3.3 GiB without; k8s/base/statefulset.yaml).
ENV PATH=/opt/mmsent/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TORCH_HOME=/tmp/.cache/torch \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MALLOC_ARENA_MAX=2 \
    MMSENT_METRICS_PORT=9108
WORKDIR /tmp
USER 10001:10001
EXPOSE 9108
# Liveness of the process's HTTP side, with the interpreter that is already here (no curl in the image).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MMSENT_METRICS_PORT', '9108'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["mmsent"]
CMD ["consume"]
