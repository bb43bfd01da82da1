# CPU image of recsvc. The GPU image is deploy/Dockerfile.gpu.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 10001 recsvc
WORKDIR /srv/recsvc
# The dependency layer, cached apart from the source (rebuilt only when the lock
# changes). Same install as the README: pinned CPU torch first, then the lock.
COPY requirements.lock ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
RUN pip install --no-deps .

USER 10001

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["recsvc", "serve", "--host", "0.0.0.0", "--port", "8000"]
