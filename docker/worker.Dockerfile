# Prefect worker that runs the flows (CPU torch is enough for ingest and register; training uses trainer.Dockerfile),
# and the worker of a Kubernetes pool (the k8s extra).
FROM python:3.11.13-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# fonts-noto-cjk: the evaluate flow's FID sample grid draws Chinese captions with it (PIL's default has no CJK glyphs).
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
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[prod,k8s]" \
    && mkdir -p /var/lib/wudao && chown wudao /var/lib/wudao
USER 1000
CMD ["prefect", "worker", "start", "--pool", "wudao-cpu", "--type", "process"]
