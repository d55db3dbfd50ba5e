# One service instance. Runtime dependencies only; runs as an unprivileged user.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY web ./web
# Installs the runtime dependencies of pyproject.toml (not the dev extras); the code runs from /app.
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home app

USER app
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status != 200)"]
# SIGTERM (docker stop) answers held polls with 204 before the process exits.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
