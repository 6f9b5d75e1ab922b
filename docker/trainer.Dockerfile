# Training image (CUDA torch), launched by a Kubernetes work-pool job with torchrun.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
# fonts-noto-cjk: the FID sample grid draws Chinese captions with it (PIL's default font has no CJK glyphs).
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv fonts-noto-cjk && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 1000 wudao
WORKDIR /opt/wudao
COPY pyproject.toml README.md ./
COPY wudao ./wudao
COPY flows ./flows
RUN pip install . && mkdir -p /var/lib/wudao && chown wudao /var/lib/wudao
USER wudao
ENTRYPOINT ["wudao"]
CMD ["--help"]
