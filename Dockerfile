# Image for Cloud Run: `gcloud builds submit --config cloudbuild.yaml` builds it (README, "Deploy").
# Offline checks: hadolint and checkov (.ci/check_deploy.sh), tests/deploy/test_dockerfile.py and
# tests/deploy/test_container_contract.py, which runs this file's start command outside Docker.

# Same Python minor as the tests (pyproject: python_version = "3.11"); slim Debian, no compilers:
# every pinned dependency ships a manylinux wheel for CPython 3.11.
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Runtime dependencies only (requirements.txt, all pinned with ==); dev tools stay out of the image.
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt


FROM python:3.11-slim-bookworm

# Cloud Run sets PORT itself; 8080 is the default for `docker run`. On Cloud Run the filesystem
# is in memory and per instance, so everything the service writes goes under /tmp, which the
# non-root user can write.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    OUTBOX_DIR=/tmp/gcs-notifier/outbox \
    DEAD_LETTER_DIR=/tmp/gcs-notifier/dead-letter \
    IDEMPOTENCY_STORE=sqlite:////tmp/gcs-notifier/state/notifier.db

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

WORKDIR /srv
COPY app/ ./app/
# Compile now: at run time the non-root user cannot write __pycache__ (and PYTHONDONTWRITEBYTECODE
# forbids it), so without this every cold start would compile the service's modules again.
RUN python -m compileall -q app/

USER 10001:10001
EXPOSE 8080

# Cloud Run ignores HEALTHCHECK (it probes the port); this serves `docker run` and local checks.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"]

# Exec form: python is PID 1 and receives Cloud Run's SIGTERM itself. `python -m app` reads HOST
# and PORT from the environment and runs uvicorn with access logs off and a graceful shutdown.
CMD ["python", "-m", "app"]
