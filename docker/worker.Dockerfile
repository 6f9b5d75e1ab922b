# Prefect worker that runs the flows (CPU torch is enough for ingest/evaluate; training uses trainer.Dockerfile).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# fonts-noto-cjk: the evaluate flow's FID sample grid draws Chinese captions with it (PIL's default has no CJK glyphs).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-noto-cjk && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 wudao
WORKDIR /opt/wudao
COPY pyproject.toml README.md ./
COPY wudao ./wudao
COPY flows ./flows
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . && mkdir -p /var/lib/wudao && chown wudao /var/lib/wudao
USER wudao
CMD ["prefect", "worker", "start", "--pool", "wudao-cpu", "--type", "process"]
