# syntax=docker/dockerfile:1

# Build stage: the dependencies into a virtual environment, with pip and its caches left behind.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --requirement /tmp/requirements.txt

# Runtime stage: the venv and the service's own files, run as an unprivileged user.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="ISS - Image Store Service" \
      org.opencontainers.image.description="Images and binary artifacts stored and served by content address" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ISS_DATA=/var/lib/iss \
    ISS_HOST=0.0.0.0 \
    ISS_PORT=8000
RUN groupadd --system --gid 10001 iss \
    && useradd --system --uid 10001 --gid iss --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin iss \
    && mkdir -p /var/lib/iss \
    && chown iss:iss /var/lib/iss
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY gunicorn.conf.py healthcheck.py iss.py openapi.yaml storage.py ./
COPY iss_server/ ./iss_server/
COPY browse/browse.css browse/browse.js browse/favicon.svg browse/index.html ./browse/
USER 10001:10001
VOLUME ["/var/lib/iss"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["python", "/app/healthcheck.py"]
CMD ["gunicorn", "--config", "/app/gunicorn.conf.py", "iss:app"]
