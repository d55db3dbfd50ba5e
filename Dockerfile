# One service instance, installed from the lock as a wheel. Runs as an unprivileged user.
# Stage 1 builds the wheel with the locked setuptools (requirements/build.txt): nothing resolved.
FROM python:3.12-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/build.txt requirements/build.txt
RUN pip install --require-hashes --no-deps -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

# Stage 2: the runtime lock (hash-checked), then the wheel itself without dependencies.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080

COPY requirements/runtime.txt /tmp/runtime.txt
COPY --from=wheel /dist /tmp/dist
RUN pip install --require-hashes --no-deps -r /tmp/runtime.txt \
    && pip install --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/runtime.txt /tmp/dist \
    && useradd --system --uid 10001 --no-create-home app

# The package runs from site-packages, templates and static files included: no source in the image.
WORKDIR /home/app
USER app
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status != 200)"]
# SIGTERM (docker stop) answers held polls with 204 before the process exits.
STOPSIGNAL SIGTERM
CMD ["taskstatus"]
