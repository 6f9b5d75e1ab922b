# Training image: runs flow runs of the GPU pool (compose's trainer worker, or one Kubernetes Job per run, see
# infra/k8s/gpu-pool.json) and launches torchrun from them. torch from PyPI is the CUDA build and brings the CUDA
# runtime libraries as wheels; the host (NVIDIA container toolkit) provides the driver.
FROM python:3.11.13-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# fonts-noto-cjk: the FID sample grid draws Chinese captions with it (PIL's default font has no CJK glyphs).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-noto-cjk=1:20220127+repack1-1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 wudao
# prefect.yaml's pull step runs flows from $WUDAO_CODE_DIR, by default /opt/wudao: the code is here.
WORKDIR /opt/wudao
COPY pyproject.toml README.md prefect.yaml ./
COPY wudao ./wudao
COPY flows ./flows
# DL3013 asks for pinned packages: this installs the project itself, whose pyproject.toml bounds the rest.
# hadolint ignore=DL3013
RUN pip install ".[prod]" && mkdir -p /var/lib/wudao && chown wudao /var/lib/wudao
# Numeric, so Kubernetes can check runAsNonRoot. No ENTRYPOINT: the worker passes the flow run's command as args.
USER 1000
CMD ["wudao", "--help"]
