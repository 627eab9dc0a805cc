# One image for the gardener and its trainers. By default it runs `gardener run` (the daemon,
# DATABASE_URL, HTTP on $PORT); a trainer service built from this repository runs the same
# image with the start command `python -m gardener.trainer` (configs/railway.toml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GARDENER_LOG_FORMAT=json \
    GARDENER_DATA_DIR=/var/lib/gardener

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gardener ./gardener
COPY migrations ./migrations
COPY configs ./configs
RUN pip install . \
    && useradd --create-home --uid 10001 gardener \
    && mkdir -p /var/lib/gardener && chown gardener /var/lib/gardener

USER gardener
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8080\")}/healthz', timeout=4)"
CMD ["gardener", "run"]
