# syntax=docker/dockerfile:1
# flaskapi-observability: the API image (default target "app") and the load generator ("locust").
#   docker build -t flaskapi-observability .
#   docker build --target locust -t flaskapi-observability-locust .
# docker-compose.yml builds both. The image serves with deploy/gunicorn.conf.py, the same file as
# `make run`, the tests and the systemd unit; settings come from the environment
# (docs/settings.md); production needs DB_URI and JWT_SECRET_KEY.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 flaskapi \
 && useradd --system --uid 10001 --gid flaskapi --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin flaskapi
WORKDIR /app

# The pinned dependencies first (read from pyproject.toml): this layer is rebuilt only when the
# pins change, not on every code change.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself, not editable (package metadata: the version in /, build_info and Sentry).
# gunicorn and the flask CLI run from /app, where migrations/ and deploy/ are.
COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info


# The lesson's load generator with the repo's locustfile (compose mounts the current one over it).
FROM base AS locust
RUN python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev'] if d.lower().startswith('locust')))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
USER flaskapi
EXPOSE 8089 9646
CMD ["locust", "-f", "locustfile.py"]


FROM base AS app
# Inside the container network only: the API on 5000 for nginx in front of it (compose publishes
# nginx, never this port: gunicorn must not face clients), the merged metrics on 9200 for Prometheus.
# Logs: JSON lines to stderr only (`docker compose logs app`), no file in the container, unless
# LOG_TO_FILE=1 (compose does it for log shipping: LOG_DIR=/var/log/flaskapi, a volume, which
# starts with this directory's owner).
RUN install -d -o flaskapi -g flaskapi -m 0750 /var/log/flaskapi
ENV FLASK_APP=service \
    FLASK_ENV=production \
    BIND=0.0.0.0:5000 \
    METRICS_BIND=0.0.0.0:9200 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/flaskapi-metrics \
    LOG_TO_FILE=0
USER flaskapi
EXPOSE 5000 9200
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('BIND', '0.0.0.0:5000').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
# The multiprocess metrics directory must be empty at every start (a restarted container keeps
# its filesystem): wipe it, then exec gunicorn as PID 1 (TERM = graceful stop, HUP = reload).
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec gunicorn -c deploy/gunicorn.conf.py"]
