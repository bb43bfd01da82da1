# One command runs the service, one command runs the tests (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build.
# Elsewhere, for a CPU-only build: make run TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# docker-compose.yml refuses to start without its secrets: validate it with stand-ins
COMPOSE_SECRETS = RECSVC_API_KEYS=lint RECSVC_ADMIN_KEYS=lint RECSVC_REDIS_PASSWORD=lint

.PHONY: run test lint install install-dev demo clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

## run: the service with the embedded store on :8000
run: $(VENV)/.base
	$(VENV)/bin/recsvc serve --host $(HOST) --port $(PORT)

## test: every test (starts a private redis-server; needs the redis-server binary)
test: $(VENV)/.dev
	@command -v redis-server >/dev/null || { echo "redis-server not found: install it (apt-get install redis-server / brew install redis); the store tests run against a real Redis" >&2; exit 3; }
	$(PY) -m pytest -q -o faulthandler_timeout=300 $(PYTEST_ARGS)

## lint: ruff, mypy, hadolint on the Dockerfiles, docker-compose config, the alert
## rules (promtool) and the Grafana dashboard (its JSON schema)
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile deploy/Dockerfile.gpu
	$(COMPOSE_SECRETS) docker-compose -f docker-compose.yml config -q
	$(COMPOSE_SECRETS) docker-compose -f docker-compose.yml --profile gpu config -q
	$(COMPOSE_SECRETS) docker-compose -f docker-compose.yml --profile observability config -q
	@command -v promtool >/dev/null || { echo "promtool not found: install it (apt-get install prometheus) to check the alert rules" >&2; exit 3; }
	promtool check rules deploy/prometheus/alerts.yml
	$(VENV)/bin/check-jsonschema --schemafile deploy/grafana/dashboard.schema.json deploy/grafana/dashboards/recsvc.json

## demo: needs a running service (make run in another shell)
demo: $(VENV)/.base
	$(VENV)/bin/recsvc demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
