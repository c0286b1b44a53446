# A GPU worker: SD UNet, VAE, text encoder and CLIP resident in fp16.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 attnseg
WORKDIR /app
COPY pyproject.toml README.md ./
COPY attnseg attnseg
COPY cli cli
COPY service service
COPY workers workers
RUN pip install '.[worker]'

USER attnseg
# Weights live in the HF cache volume: download them once, or set HF_HUB_OFFLINE=1 with a filled cache.
ENV HF_HOME=/home/attnseg/.cache/huggingface ATTNSEG_CACHE_DIR=/home/attnseg/.cache/attnseg
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["attnseg", "health", "worker"]
CMD ["attnseg", "worker"]
