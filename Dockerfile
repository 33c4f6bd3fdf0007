# The notifier service image: `docker compose up` builds it.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY service ./service
COPY templates ./templates
# The runtime dependencies exactly as uv.lock pins them (hashes checked), then the project,
# whose wheel carries the templates (service/templates): no NOTIFY_TEMPLATES_DIR needed.
# uv's version is the one uv.lock pins (tests/test_compose.py checks they agree).
RUN pip install "uv==0.13.9" \
    && uv export --frozen --no-emit-project --no-header --output-file /tmp/requirements.txt \
    && pip install --require-hashes -r /tmp/requirements.txt \
    && pip install --no-deps . \
    && pip uninstall -y uv && rm /tmp/requirements.txt \
    && useradd --system --uid 10001 notifier && mkdir -p /var/lib/notifier /srv/attachments \
    && chown notifier /var/lib/notifier
COPY examples ./examples
USER notifier
ENV NOTIFY_LEDGER_URL=sqlite:////var/lib/notifier/ledger.sqlite3 \
    NOTIFY_HTTP_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
ENTRYPOINT ["notifier"]
CMD ["run"]
