# One image for every service of docker-compose.yml: migrate, web (the admin), worker, beat.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app
# Dependencies first, from pyproject.toml alone: a change to the code rebuilds from the COPY
# below, not from a reinstall of every dependency.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY . .
# collectstatic loads the settings, which refuse the placeholder secret with DEBUG off.
RUN pip install --no-deps . \
    && DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput --verbosity 0 \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /app/logs /app/var \
    && chown -R app /app/logs /app/var

USER app
EXPOSE 8000
