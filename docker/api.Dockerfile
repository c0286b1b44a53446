# The HTTP API: no torch, no models; starts in a second.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 attnseg
WORKDIR /app
# Base dependencies only, from the lock (the worker extra: torch, diffusers, open_clip is not here).
COPY requirements/api.txt requirements/api.txt
RUN pip install -r requirements/api.txt
COPY pyproject.toml README.md ./
COPY attnseg attnseg
COPY cli cli
COPY service service
COPY workers workers
RUN pip install --no-deps .

USER attnseg
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["attnseg", "api", "--host", "0.0.0.0", "--port", "8000"]
