# The notifier service image: `docker compose up` builds it.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY templates ./templates
RUN pip install . && useradd --system --uid 10001 notifier && mkdir -p /var/lib/notifier /srv/attachments \
    && chown notifier /var/lib/notifier
COPY examples ./examples
USER notifier
ENV NOTIFY_TEMPLATES_DIR=/app/templates \
    NOTIFY_LEDGER_URL=sqlite:////var/lib/notifier/ledger.sqlite3 \
    NOTIFY_HTTP_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
ENTRYPOINT ["notifier"]
CMD ["run"]
