# A GPU worker: SD UNet, VAE, text encoder and CLIP resident in fp16.
# No CUDA base image: the locked torch wheel brings its own CUDA 13 runtime, cuDNN and cuBLAS as
# pip packages (nvidia-*), so a CUDA base would only add a second, unused copy. The host needs an
# NVIDIA driver >= 580 (CUDA 13) and the NVIDIA Container Toolkit, which mounts the driver.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN useradd --create-home --uid 10001 attnseg
WORKDIR /app
# Dependencies first, from the lock, so a code change does not reinstall torch.
COPY requirements/worker.txt requirements/worker.txt
RUN pip install -r requirements/worker.txt
COPY pyproject.toml README.md ./
COPY attnseg attnseg
COPY cli cli
COPY service service
COPY workers workers
RUN pip install --no-deps .

USER attnseg
# Weights live in the HF cache volume: download them once, or set HF_HUB_OFFLINE=1 with a filled cache.
ENV HF_HOME=/home/attnseg/.cache/huggingface ATTNSEG_CACHE_DIR=/home/attnseg/.cache/attnseg
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["attnseg", "health", "worker"]
CMD ["attnseg", "worker"]
