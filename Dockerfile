# syntax=docker/dockerfile:1
# Two images from one file:
#   --target api     FastAPI + migrations; CPU-only torch (the API never imports torch, but the package depends on it)
#   --target worker  Celery worker with CUDA torch
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 app && mkdir -p /data /models /datasets && chown app /data
WORKDIR /app

# ---- api: no CUDA -------------------------------------------------------------------------------------------------
FROM base AS api
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY lorashear ./lorashear
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -e '.[service]'
USER app
EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# ---- worker: CUDA torch -----------------------------------------------------------------------------------------------
FROM base AS worker
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY lorashear ./lorashear
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
RUN pip install -e '.[service]'
USER app
CMD ["celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO"]
