# Two commands for a fresh machine: `make run` and `make test`.
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo .uv-venv/bin/uv)

.PHONY: run test faults lint bench bench-lanes schemas rabbitmq redis promtool dovecot

.uv-venv/bin/uv:
	python3 -m venv .uv-venv
	.uv-venv/bin/pip install -q uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $@

rabbitmq:
	scripts/ensure-rabbitmq

# The shared state store the tests and the benchmark use; `make run` keeps its state in memory.
redis:
	scripts/ensure-redis

# Prometheus's checker: the tests check the chart's alerting rules and the dashboard's queries.
promtool:
	scripts/ensure-promtool

# The mailbox server of the IMAP reply source's tests (and of trying that mode by hand).
dovecot:
	scripts/ensure-dovecot

run: $(VENV)/.synced rabbitmq
	$(VENV)/bin/smsc-worker run --emulator

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check worker tests bench
	$(VENV)/bin/ruff format --check worker tests bench
	$(VENV)/bin/mypy worker

test: lint rabbitmq redis promtool dovecot
	$(VENV)/bin/pytest -n 2 -q

faults: lint rabbitmq redis
	SMSC_SLOW_TESTS=1 $(VENV)/bin/pytest -n 2 -q tests/test_faults.py

bench: $(VENV)/.synced rabbitmq redis
	$(VENV)/bin/python -m bench.run

bench-lanes: $(VENV)/.synced rabbitmq
	$(VENV)/bin/python -m bench.lanes

schemas: $(VENV)/.synced
	$(VENV)/bin/smsc-worker schemas
