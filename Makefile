# Every target sets up what it needs: a fresh Debian/Ubuntu machine with Python 3.11+ is enough.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
PORT ?= 8080
SYSTEM_PACKAGES := redis-server:redis-server nginx:nginx chromium:chromium docker-compose:docker-compose

.PHONY: run demo demo-ha bench-ha test lint fmt typecheck bench bench-quick bench-setup screenshot system-packages \
	lock lock-check upgrade wheel clean

# Installs come from the lock only (requirements/*.txt, hash-pinned, see requirements/lock.sh):
# pip installs uv from requirements/uv.txt, uv makes the venv hold exactly one lock file.
# The code itself runs from the checkout (python -m service); `make wheel` builds the package.
$(UV): requirements/uv.txt
	@# Debian's own python3 makes a venv only with python3-venv (no ensurepip without it)
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || bash deploy/ensure-packages.sh no-ensurepip:python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	touch $@

# .venv/.synced-dev: the venv holds exactly requirements/dev.txt (and nothing since removed)
$(VENV)/.synced-%: requirements/%.txt $(UV)
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes $<
	rm -f $(VENV)/.synced-*
	touch $@

DEV := $(VENV)/.synced-dev

system-packages:
	bash deploy/ensure-packages.sh $(SYSTEM_PACKAGES)

run: $(VENV)/.synced-runtime  ## the service on its embedded backend, http://localhost:8080
	$(BIN)/python -m service --port $(PORT)

demo: $(VENV)/.synced-runtime  ## redis-server, 3 instances and nginx as local processes
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	$(BIN)/python -m deploy.demo --port $(PORT)

demo-ha: $(VENV)/.synced-runtime  ## Redis primary + 2 replicas + 3 Sentinels, 3 instances, nginx
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	$(BIN)/python -m deploy.demo --ha --port $(PORT)

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV)
	$(BIN)/mypy

fmt: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lock-check $(DEV) system-packages lint typecheck  ## the whole suite
	$(BIN)/pytest

lock-check: $(UV)  ## fails, naming the fix, when requirements/ no longer satisfies pyproject.toml
	UV=$(CURDIR)/$(UV) bash requirements/lock.sh check

lock: $(UV)  ## re-resolve the lock, keeping every pin that still fits
	UV=$(CURDIR)/$(UV) bash requirements/lock.sh compile

upgrade: $(UV)  ## re-lock at the newest releases, then run the whole suite on them
	UV=$(CURDIR)/$(UV) bash requirements/lock.sh upgrade
	$(MAKE) test

wheel: $(DEV)  ## dist/taskstatus-*.whl, built with the locked setuptools (no resolution)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

NCHAN_MODULE := /usr/lib/nginx/modules/ngx_nchan_module.so

bench-setup: $(VENV)/.synced-bench
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	test -f $(NCHAN_MODULE) || { s=$$([ "$$(id -u)" -eq 0 ] || echo sudo); $$s apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$s apt-get install -y -qq --no-install-recommends libnginx-mod-nchan; }

bench: bench-setup  ## every target and scenario, 10,000 polls (about 14 minutes): bench/results/
	$(BIN)/python -m bench
	$(BIN)/python -m bench.ha

bench-ha: bench-setup  ## the price of replicated writes, and failover times (about 2 minutes)
	$(BIN)/python -m bench.ha

bench-quick: bench-setup  ## 1,000 polls, this service and the seed design, under 2 minutes
	$(BIN)/python -m bench --quick

screenshot: $(DEV)  ## docs/board.png: the board, photographed on a running cluster
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx chromium:chromium
	$(BIN)/python -m tests.screenshot

.PHONY: soak
soak: $(VENV)/.synced-runtime  ## bounded soak, not in make test: 5,000 waiters, 20 updates/s, MINUTES=10
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	$(BIN)/python -m deploy.soak --minutes $(or $(MINUTES),10)

.PHONY: soak-expiry
soak-expiry: $(VENV)/.synced-runtime  ## the store stops growing: 100,000 tasks created, finished, expired
	bash deploy/ensure-packages.sh redis-server:redis-server nginx:nginx
	$(BIN)/python -m deploy.expiry_soak --tasks $(or $(TASKS),100000)

clean:
	rm -rf $(VENV) dist build .mypy_cache .ruff_cache .pytest_cache test-artifacts
