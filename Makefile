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

.PHONY: run test test-lowest lint install install-dev demo lock check-pins clean

# Every version comes from requirements.lock (make lock regenerates it).
$(VENV)/.base: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -c requirements.lock -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
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

## test-lowest: the unit tests on the lowest versions pyproject.toml allows (a venv of
## its own, .venv-lowest), so that no floor claims more than was tested
UNIT_TESTS = tests/test_api.py tests/test_store_contract.py tests/test_memory_store.py \
	tests/test_qnet_learner.py tests/test_ensemble.py tests/test_adaptation.py \
	tests/test_encoder.py tests/test_index.py tests/test_exploration.py tests/test_rewards.py \
	tests/test_ope.py tests/test_session.py tests/test_explain.py tests/test_lean_routes.py \
	tests/test_workers.py tests/test_qnet_numpy.py tests/test_batch.py
test-lowest:
	@command -v redis-server >/dev/null || { echo "redis-server not found: install it (apt-get install redis-server / brew install redis)" >&2; exit 3; }
	rm -rf .venv-lowest
	$(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/pip install --quiet --upgrade pip
	.venv-lowest/bin/pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PYTHON) .ci/lowest.py > .venv-lowest/lowest.txt
	.venv-lowest/bin/pip install --quiet -c .venv-lowest/lowest.txt -e '.[dev]'
	.venv-lowest/bin/pip list --format=freeze | grep -i -E "^($$(cut -d= -f1 .venv-lowest/lowest.txt | sed 's/[-_]/[-_]/g' | paste -sd'|'))=="
	.venv-lowest/bin/python -m pytest -q -p no:cacheprovider -o faulthandler_timeout=300 $(UNIT_TESTS)

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

## demo: starts its own service and plays simulated users against it (about a minute)
$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install --quiet -c requirements.lock -e '.[demo]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/recsvc demo

## lock: requirements.lock from a fresh resolve of pyproject.toml, torch's CPU build
## included (where plain pip would take a CUDA torch, pass TORCH_PIP_ARGS="--index-url
## https://download.pytorch.org/whl/cpu"; a lock with CUDA wheels is refused)
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	.lock-venv/bin/pip install --quiet .
	.lock-venv/bin/pip freeze --exclude-editable > .lock-venv/freeze.txt
	! grep -i -E '^(nvidia-|triton)' .lock-venv/freeze.txt || { echo "CUDA wheels in the lock: install torch's CPU build (TORCH_PIP_ARGS)" >&2; exit 1; }
	{ sed -n '1,3p' requirements.lock; grep -v '^recsvc' .lock-venv/freeze.txt \
	  | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > .lock-venv/lock.txt
	mv .lock-venv/lock.txt requirements.lock
	rm -rf .lock-venv

## check-pins: the images' pinned wheels exist and resolve together (no Docker needed)
check-pins: $(VENV)/.base
	deploy/check-pins.sh $(VENV)/bin/pip

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
