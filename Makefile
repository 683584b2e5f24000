# Everything runs from the venv that ./install.sh creates (BUILD_PROFILE, FROM_SOURCE
# and PYTHON are passed through to it from the environment or the make command line).

PY   := venv/bin/python
ADDR ?= 127.0.0.1:50051

STAMP          := venv/.install-stamp
INSTALL_INPUTS := install.sh requirements.txt $(wildcard requirements-*.txt) backend.proto
GEN_FILES      := backend/gen/__init__.py backend/gen/backend_pb2.py \
                  backend/gen/backend_pb2_grpc.py backend/gen/backend_pb2.pyi

export BUILD_PROFILE FROM_SOURCE PYTHON

.DEFAULT_GOAL := help
.PHONY: help install protogen run test test-unit test-integration test-e2e lint demo bench clean

help:
	@echo "make install           create/update ./venv + stubs (./install.sh; skipped if up to date)"
	@echo "make protogen          regenerate backend/gen/ from backend.proto"
	@echo "make run [ADDR=h:p]    start the worker: ./run.sh --addr \$$ADDR ($(ADDR))"
	@echo "make test              install, then pytest tests"
	@echo "make test-unit | test-integration | test-e2e"
	@echo "make lint              ruff check, ruff format --check, mypy backend"
	@echo "make demo | bench"
	@echo "make clean             remove venv, backend/gen, .cache, lib, __pycache__"

# Runs ./install.sh only when something it depends on is newer than the stamp, a stub is
# missing, or a profile/source build is asked for explicitly; ./install.sh itself also
# skips pip when its stamp hash matches, so `./install.sh` by hand is always fine too.
install:
	@if [ ! -f $(STAMP) ] || [ -n "$(strip $(BUILD_PROFILE)$(FROM_SOURCE))" ] \
	   || [ -n "$$(find $(INSTALL_INPUTS) -newer $(STAMP) 2>/dev/null)" ] \
	   || ! ls $(GEN_FILES) >/dev/null 2>&1; then \
		./install.sh; \
	else \
		echo "install: up to date ($(STAMP)); ./install.sh --force to redo"; \
	fi

# The protoc command lives in install.sh only (one source of truth).
protogen:
	./install.sh --protogen-only

run: install
	./run.sh --addr $(ADDR)

test: install
	$(PY) -m pytest tests

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install
	$(PY) -m pytest tests/integration

test-e2e: install
	$(PY) tests/e2e/harness.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy backend

demo: install
	$(PY) -m tools.demo

bench: install
	$(PY) -m bench

clean:
	rm -rf venv backend/gen .cache lib
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
