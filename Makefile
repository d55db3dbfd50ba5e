# Every target sets up what it needs: a fresh Debian/Ubuntu machine with Python 3.11+ is enough.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080
SYSTEM_PACKAGES := redis-server:redis-server nginx:nginx chromium:chromium docker-compose:docker-compose

.PHONY: run demo test lint fmt typecheck bench bench-quick bench-setup screenshot system-packages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

system-packages:
	bash deploy/ensure-packages.sh $(SYSTEM_PACKAGES)

run: $(STAMP)  ## the service on its embedded backend, http://localhost:8080
	$(BIN)/python -m service --port $(PORT)

demo: $(STAMP)  ## redis-server, 3 instances and nginx as local processes
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	$(BIN)/python -m deploy.demo --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) system-packages lint typecheck  ## the whole suite
	$(BIN)/pytest

BENCH_STAMP := $(VENV)/.installed-bench
NCHAN_MODULE := /usr/lib/nginx/modules/ngx_nchan_module.so

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench-setup: $(BENCH_STAMP)
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	test -f $(NCHAN_MODULE) || { s=$$([ "$$(id -u)" -eq 0 ] || echo sudo); $$s apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$s apt-get install -y -qq --no-install-recommends libnginx-mod-nchan; }

bench: bench-setup  ## every target and scenario, 10,000 polls (about 12 minutes): bench/results/
	$(BIN)/python -m bench

bench-quick: bench-setup  ## 1,000 polls, this service and the seed design, under 2 minutes
	$(BIN)/python -m bench --quick

screenshot: $(STAMP)  ## docs/board.png: the board, photographed on a running cluster
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx chromium:chromium
	$(BIN)/python -m tests.screenshot

.PHONY: soak
soak: $(STAMP)  ## bounded soak, not in make test: 5,000 waiters, 20 updates/s, MINUTES=10
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	$(BIN)/python -m deploy.soak --minutes $(or $(MINUTES),10)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache test-artifacts
