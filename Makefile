# Two commands matter: `make run` (serve on 127.0.0.1:5000) and `make test`. `make run-edge` puts
# nginx in front (127.0.0.1:8080), as deployed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install system-deps lint run run-edge locust test test-stress demo fleet bench bench-quick db-upgrade db-seed db-stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned dependencies

db-upgrade: install ## apply migrations (embedded Postgres unless DB_URI is set)
	$(BIN)/python -m flask db upgrade

db-seed: install ## add demo users and books
	$(BIN)/python -m flask db-custom seed

METRICS_DIR ?= .data/metrics

# One instance per metrics directory: a second start stops with one line before touching
# anything; then migrations, an empty metrics directory, gunicorn (bench/serve.py).
run: install ## serve the API on $${BIND:-127.0.0.1:5000}, metrics on $${METRICS_BIND:-127.0.0.1:9200}
	@PROMETHEUS_MULTIPROC_DIR=$(abspath $(METRICS_DIR)) $(BIN)/python -m bench.serve

EDGE_BIND ?= 127.0.0.1:8080

run-edge: install ## as `make run`, with nginx (deploy/nginx/flaskapi.conf) in front on $${EDGE_BIND:-127.0.0.1:8080}
	@EDGE_BIND=$(EDGE_BIND) PROMETHEUS_MULTIPROC_DIR=$(abspath $(METRICS_DIR)) $(BIN)/python -m bench.edge

LOCUST_HOST ?= http://127.0.0.1:5000

locust: install ## locust's web UI on http://127.0.0.1:8089, the project's locustfile against $${LOCUST_HOST:-http://127.0.0.1:5000} (`make run` first)
	$(BIN)/locust -f locustfile.py --host $(LOCUST_HOST) --web-host 127.0.0.1 $(LOCUST_ARGS)

system-deps: ## Debian tools the tests and benchmarks run for real (prometheus, prometheus-alertmanager, nginx, shellcheck, docker-compose, wrk, chromium-headless-shell, jq)
	bash .ci/system-deps.sh

lint: install ## ruff: the rules in pyproject.toml, and the formatting (`ruff format .` fixes it)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install system-deps lint ## lint, then the whole suite against real Postgres, gunicorn, Prometheus, nginx
	$(BIN)/python -m pytest $(PYTEST_ARGS)

STRESS_CORES ?= 1

test-stress: install system-deps ## the suite while busy loops hold $${STRESS_CORES:-1} core(s): proves no verdict rests on the machine's speed
	@hogs=""; for _ in $$(seq $(STRESS_CORES)); do sh -c 'while :; do :; done' & hogs="$$hogs $$!"; done; \
	trap 'kill $$hogs 2>/dev/null' EXIT INT TERM; \
	echo "busy loops on $(STRESS_CORES) core(s): pids$$hogs"; \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install ## 200-user locust ramp with a crash, watched by Prometheus and Alertmanager, judged (exit 1 on a failed check); report in reports/
	$(BIN)/python -m bench.demo $(DEMO_ARGS)

fleet: install system-deps ## 2 app instances behind nginx, the exporters, Prometheus, locust in 2 processes: one view, judged; report in reports/
	$(BIN)/python -m bench.fleet $(FLEET_ARGS)

bench: install system-deps ## the full benchmark (about 8 minutes): figures and ratios, bench/results/
	$(BIN)/python -m bench.run

bench-quick: install system-deps ## the same scenarios at smaller scale, under 3 minutes
	$(BIN)/python -m bench.run --quick

db-stop: install ## stop the embedded development Postgres, unless a process still uses it (then: which, and exit 1)
	@$(BIN)/python -m service.devdb stop

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
