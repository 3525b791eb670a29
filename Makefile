# The two front doors: `make demo` (embedded default: SQLite, eager tasks) and `make test`
# (the whole suite on PostgreSQL and Redis). Both set up .venv on first use.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Where the suite finds the services (override to run two checkouts side by side).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/profile_sync_audit
TEST_REDIS_URL ?= redis://127.0.0.1:6379/9
PYTEST_ARGS ?=

.PHONY: help install demo test test-sqlite test-browser test-pythons check-alerts lint format bench clean

help:
	@echo "make demo         set up, seed demo data, dry run, --fix, dry run again (SQLite)"
	@echo "make test         the whole suite on PostgreSQL and Redis"
	@echo "make test-sqlite  the whole suite on SQLite (Redis still used for broker and lock)"
	@echo "make test-browser the admin in headless Chromium (needs the chromium package)"
	@echo "make test-pythons the suite on Python 3.12 and 3.13 (nox; PostgreSQL and Redis)"
	@echo "make check-alerts promtool and amtool on the shipped rules and routing"
	@echo "make lint         ruff check, ruff format --check and mypy"
	@echo "make bench        the audit benchmark (see bench/README.md)"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The embedded default: no DATABASE_URL, no REDIS_URL.
DEMO_ENV := env -u DATABASE_URL -u REDIS_URL SQLITE_PATH=var/demo.sqlite3 PROFILE_AUDIT_CONSOLE_LEVEL=WARNING \
	DJANGO_DEBUG=true

demo: install
	$(DEMO_ENV) $(BIN)/python manage.py migrate --verbosity 0
	$(DEMO_ENV) $(BIN)/python manage.py seed_demo
	@echo; echo "== 1. Dry run: what is wrong (nothing is changed) =="
	$(DEMO_ENV) $(BIN)/python manage.py profiles_audit_sync -v 2
	@echo; echo "== 2. Fix =="
	$(DEMO_ENV) $(BIN)/python manage.py profiles_audit_sync --fix
	@echo; echo "== 3. Dry run again: nothing left (--check exits non-zero otherwise) =="
	$(DEMO_ENV) $(BIN)/python manage.py profiles_audit_sync --check

# The browser check has its own target (it needs Chromium); .ci/run runs all three.
test: install
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) PROFILE_AUDIT_TEST_DB=postgres \
		$(BIN)/pytest -m "not browser" $(PYTEST_ARGS)

test-sqlite: install
	env -u DATABASE_URL REDIS_URL=$(TEST_REDIS_URL) PROFILE_AUDIT_TEST_DB=sqlite \
		$(BIN)/pytest -m "not browser" $(PYTEST_ARGS)

test-browser: install
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) PROFILE_AUDIT_TEST_DB=postgres \
		$(BIN)/pytest -m browser tests/test_browser.py $(PYTEST_ARGS)

# The other Pythons pyproject.toml declares (noxfile.py), on PostgreSQL only.
test-pythons: install
	TEST_DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) \
		$(BIN)/nox -s tests -- $(PYTEST_ARGS)

# The alert rules and routing, by the operators' own tools (Debian: prometheus,
# prometheus-alertmanager). tests/test_alert_rules.py runs the same within `make test`.
check-alerts:
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml
	promtool check config deploy/prometheus/prometheus.yml
	amtool check-config deploy/alertmanager/alertmanager.yml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	DJANGO_DEBUG=$${DJANGO_DEBUG:-false} DJANGO_SECRET_KEY=$${DJANGO_SECRET_KEY:-local-benchmark-only-key-not-for-serving-anything-at-all} \
		$(BIN)/python bench/audit_bench.py $(BENCH_ARGS)

clean:
	rm -rf var logs .pytest_cache .hypothesis .nox
