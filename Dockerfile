# syntax=docker/dockerfile:1
# smsc-worker image: `docker build -t smsc-worker .`
# tests/test_dockerfile.py lints this file and replays its build steps, so keep the
# builder's steps to COPY, ENV, WORKDIR and RUN.

# uv at the version that uv.lock pins as a dev dependency (the test checks they match).
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.14-slim-trixie AS builder
COPY --from=uv /uv /usr/local/bin/uv
# Bytecode is compiled here because the runtime root filesystem is read-only; files are
# copied, not hard-linked, out of the cache mount that is gone after each step; the venv
# must use the base image's interpreter, which the final stage has at the same path.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# Dependencies get a layer of their own so that a code change does not reinstall them.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --no-install-project
COPY README.md ./
COPY worker ./worker
# Non-editable: the final stage gets /opt/venv only, not the sources in /src.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# Same base as the builder: the venv's interpreter links point into it.
FROM python:3.11.14-slim-trixie
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1
COPY --from=builder /opt/venv /opt/venv
# A numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
# Reply SMTP receiver, health (/livez, /readyz), Prometheus metrics.
EXPOSE 2525 8080 9100
# Exec form: smsc-worker is PID 1 and receives SIGTERM itself to drain.
ENTRYPOINT ["smsc-worker"]
CMD ["run"]
