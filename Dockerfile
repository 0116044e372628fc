# Gorgon inference server images (see docs/docker.md).
#
#   DOCKER_BUILDKIT=1 docker build -t gorgon:cpu .                   # CPU image (default target)
#   DOCKER_BUILDKIT=1 docker build --target cuda -t gorgon:cuda .    # NVIDIA GPU image
#
# BuildKit is required (RUN --mount for the optional pip CA secret); it is the default builder
# of Docker 23+ and of `docker compose build`. No `# syntax=` line on purpose: the built-in
# Dockerfile frontend is enough, and a syntax image would have to be pulled from a registry.
#
# Build arguments:
#   TORCH_VERSION     torch release to install (default 2.13.0)
#   TORCH_INDEX_URL   index torch is installed from. cpu: the PyTorch CPU index (CPU-only wheels,
#                     ~200 MB instead of several GB); cuda: PyPI, whose default torch is a CUDA build
#   WHEELS_DIR        folder in the build context whose wheels pip may use (default deploy/wheels);
#                     put a local torch "+cpu" wheel there to build without the PyTorch index
#   GORGON_EXTRAS     optional-dependency groups of pyproject.toml to add, comma-separated
#   SLIM_TRITON       cpu only: 1 (default) drops the GPU toolchains bundled in the triton wheel
#   FETCH_MODEL       1: download the default model (SmolLM2-135M-Instruct) into /data at build
#                     time, so the first start needs no network. Default 0: the server fetches it
#                     on first start into the /data volume
#   GORGON_UID        uid/gid of the non-root user that runs the server (default 10001)
# Build secret (optional):
#   --secret id=pip_cert,src=/path/to/ca-bundle.crt   CA bundle for pip behind a TLS-intercepting
#                                                      proxy; without it pip uses its own CAs

ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ------------------------------------------------------------------------------------------
# CUDA flavour. Its stages come first so that `cpu`, the last stage, is the default target.
# ------------------------------------------------------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS cuda-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# gcc, libc6-dev and python3-dev stay in the runtime image: Triton compiles its small C
# launcher stubs against Python.h with the system C compiler the first time a kernel runs.
# Package versions are not pinned (DL3008): the base image tag fixes the distribution
# release, and pinning exact Ubuntu package versions breaks the build whenever the archive
# publishes a security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-builder
ENV VIRTUAL_ENV=/opt/gorgon \
    PATH=/opt/gorgon/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/gorgon
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG WHEELS_DIR=deploy/wheels
COPY ${WHEELS_DIR}/ /tmp/wheels/
# Fails the build if a CPU-only torch slipped in (e.g. a +cpu wheel left in WHEELS_DIR).
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); assert torch.version.cuda, 'torch is a CPU-only build'"
# Dependencies first, in a layer of their own: editing the source does not reinstall them.
COPY deploy/docker/pyproject-requirements.py pyproject.toml /tmp/deps/
ARG GORGON_EXTRAS=
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && GORGON_EXTRAS="${GORGON_EXTRAS}" python /tmp/deps/pyproject-requirements.py /tmp/deps/pyproject.toml \
      > /tmp/deps/requirements.txt \
 && pip install --find-links /tmp/wheels -r /tmp/deps/requirements.txt
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY models /src/models
COPY kernels /src/kernels
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --find-links /tmp/wheels "/src${GORGON_EXTRAS:+[${GORGON_EXTRAS}]}" \
 && pip check

FROM cuda-base AS cuda
ARG GORGON_UID=10001
RUN groupadd --system --gid "${GORGON_UID}" gorgon \
 && useradd --system --uid "${GORGON_UID}" --gid gorgon --create-home --home-dir /home/gorgon \
      --shell /usr/sbin/nologin gorgon \
 && install -d -o gorgon -g gorgon -m 0755 /data
COPY --from=cuda-builder /opt/gorgon /opt/gorgon
ENV VIRTUAL_ENV=/opt/gorgon \
    PATH=/opt/gorgon/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GORGON_HOME=/data \
    GORGON_HOST=0.0.0.0 \
    GORGON_PORT=8000 \
    GORGON_DEVICE=cuda \
    HF_HOME=/data/huggingface \
    TRITON_CACHE_DIR=/data/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/data/cache/torchinductor
WORKDIR /home/gorgon
USER ${GORGON_UID}:${GORGON_UID}
ARG FETCH_MODEL=0
# Runs before VOLUME: files written into /data here become the image's copy of the volume,
# which Docker copies into a new named volume the first time it is mounted.
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ "${FETCH_MODEL}" = "1" ]; then \
      if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
      python -m models.fetch; \
    else \
      echo "FETCH_MODEL=0: the default model is fetched into /data on first start"; \
    fi
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GORGON_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "server"]

# ------------------------------------------------------------------------------------------
# CPU flavour (default target): Debian + CPU-only torch; kernels use PyTorch reference code.
# ------------------------------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS cpu-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Package versions are not pinned (DL3008): the base image tag fixes the Debian release, and
# exact Debian package versions disappear from the archive with every security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 \
 && rm -rf /var/lib/apt/lists/*

FROM cpu-base AS cpu-builder
# Same reason as above for not pinning (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/gorgon \
    PATH=/opt/gorgon/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/gorgon
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS_DIR=deploy/wheels
COPY ${WHEELS_DIR}/ /tmp/wheels/
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --find-links /tmp/wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY deploy/docker/pyproject-requirements.py pyproject.toml /tmp/deps/
ARG GORGON_EXTRAS=
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && GORGON_EXTRAS="${GORGON_EXTRAS}" python /tmp/deps/pyproject-requirements.py /tmp/deps/pyproject.toml \
      > /tmp/deps/requirements.txt \
 && pip install --find-links /tmp/wheels -r /tmp/deps/requirements.txt
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY models /src/models
COPY kernels /src/kernels
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --find-links /tmp/wheels "/src${GORGON_EXTRAS:+[${GORGON_EXTRAS}]}" \
 && pip check
# On the CPU, Gorgon uses its PyTorch reference kernels and Triton runs (in tests) only in its
# interpreter, so the GPU toolchains and libraries bundled in the triton wheel (ptxas, CUPTI,
# ROCm libraries: ~470 MB of the image) are never used. Drop them; the Python package stays
# importable. SLIM_TRITON=0 keeps the wheel whole.
ARG SLIM_TRITON=1
RUN if [ "${SLIM_TRITON}" = "1" ]; then \
      triton_dir="$(python -c 'import os, triton; print(os.path.dirname(triton.__file__))')" \
      && rm -rf "${triton_dir}/backends/nvidia/bin" "${triton_dir}/backends/nvidia/lib" \
                "${triton_dir}/backends/amd/lib"; \
    fi \
 && python -c "import triton, triton.language, kernels, models, server"

FROM cpu-base AS cpu
ARG GORGON_UID=10001
RUN groupadd --system --gid "${GORGON_UID}" gorgon \
 && useradd --system --uid "${GORGON_UID}" --gid gorgon --create-home --home-dir /home/gorgon \
      --shell /usr/sbin/nologin gorgon \
 && install -d -o gorgon -g gorgon -m 0755 /data
COPY --from=cpu-builder /opt/gorgon /opt/gorgon
ENV VIRTUAL_ENV=/opt/gorgon \
    PATH=/opt/gorgon/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GORGON_HOME=/data \
    GORGON_HOST=0.0.0.0 \
    GORGON_PORT=8000 \
    GORGON_DEVICE=cpu \
    HF_HOME=/data/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/data/cache/torchinductor
WORKDIR /home/gorgon
USER ${GORGON_UID}:${GORGON_UID}
ARG FETCH_MODEL=0
# Runs before VOLUME: files written into /data here become the image's copy of the volume,
# which Docker copies into a new named volume the first time it is mounted.
RUN --mount=type=secret,id=pip_cert,mode=0444 \
    if [ "${FETCH_MODEL}" = "1" ]; then \
      if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
      python -m models.fetch; \
    else \
      echo "FETCH_MODEL=0: the default model is fetched into /data on first start"; \
    fi
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GORGON_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "server"]
