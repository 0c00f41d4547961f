# Two commands for a fresh machine: `make run` and `make test`.
VENV := .venv
UV := $(shell command -v uv 2>/dev/null || echo .uv-venv/bin/uv)

.PHONY: run test lint bench schemas rabbitmq

.uv-venv/bin/uv:
	python3 -m venv .uv-venv
	.uv-venv/bin/pip install -q uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $@

rabbitmq:
	scripts/ensure-rabbitmq

run: $(VENV)/.synced rabbitmq
	$(VENV)/bin/smsc-worker run --emulator

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check worker tests bench
	$(VENV)/bin/ruff format --check worker tests bench
	$(VENV)/bin/mypy worker

test: lint rabbitmq
	$(VENV)/bin/pytest -n 2 -q

bench: $(VENV)/.synced rabbitmq
	$(VENV)/bin/python -m bench.run

schemas: $(VENV)/.synced
	$(VENV)/bin/smsc-worker schemas
