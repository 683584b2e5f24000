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
.PHONY: help install protogen package run test test-all test-unit test-integration test-e2e lint demo real-models bench clean
.PHONY: docker-build-cpu docker-build-cublas12 docker-build-hipblas test-image

help:
	@echo "make install           create/update ./venv + stubs (./install.sh; skipped if up to date)"
	@echo "make protogen          regenerate backend/gen/ from backend.proto"
	@echo "make package           bundle libnuma/libgomp into ./lib, report other system libs (./package.sh)"
	@echo "make run [ADDR=h:p]    start the worker: ./run.sh --addr \$$ADDR ($(ADDR))"
	@echo "make test              install, then pytest tests"
	@echo "make test-unit | test-integration | test-e2e"
	@echo "make lint              ruff check, ruff format --check, mypy backend"
	@echo "make demo | bench       demo: SmolLM2 + MiniLM (fetched/converted on first use)"
	@echo "make real-models       fetch, convert and verify the real models (tools/real_models.py)"
	@echo "make clean             remove venv, backend/gen, .cache, lib, __pycache__"
	@echo "make docker-build-cpu | docker-build-cublas12 | docker-build-hipblas [BASE_IMAGE=..]"
	@echo "                       backend image from Dockerfile.python (docker, else podman/buildah)"
	@echo "make test-image [IMAGE=$(IMAGE)]  unpack the image like the gateway, drive it over gRPC"

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

# make test leaves out the tests marked long (variants a faster test covers);
# make test-all runs every test. Both run TEST_JOBS test processes side by side
# (pytest-xdist; a module stays in one process, so its fixtures are shared): an
# engine start is one core's work (imports), and this machine has two.
TEST_JOBS ?= 2
PYTEST_JOBS := -n $(TEST_JOBS) --dist loadfile

test: install
	$(PY) -m pytest tests -m "not long" $(PYTEST_JOBS)

test-all: install
	$(PY) -m pytest tests $(PYTEST_JOBS)

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install
	$(PY) -m pytest tests/integration

# ./package.sh is idempotent (copies only what changed); BACKEND_TEST_* select what the
# harness covers (see tests/e2e/harness.py).
package: install
	./package.sh

test-e2e: install package
	$(PY) tests/e2e/harness.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy backend

demo: install
	$(PY) -m tools.demo

real-models: install
	$(PY) -m tools.real_models

bench: install
	$(PY) -m bench

clean:
	rm -rf venv backend/gen .cache lib
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +

# ---- backend images (Dockerfile.python, tests/image/) -------------------------------
# The engine is docker when its daemon answers, else podman, else buildah
# (tests/image/engine.sh; CONTAINER_ENGINE=... overrides). BASE_IMAGE overrides the
# profile's builder image; FROM_SOURCE is passed through when given; DOCKER_BUILD_FLAGS
# adds engine flags (e.g. podman's -v DIR:DIR:ro plus --build-arg PIP_FIND_LINKS=DIR).
IMAGE_NAME ?= vllm-backend
IMAGE      ?= $(IMAGE_NAME):cpu
DOCKER_BUILD_FLAGS ?=
BASE_IMAGE_cpu      := ubuntu:24.04
BASE_IMAGE_cublas12 := nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04
BASE_IMAGE_hipblas  := rocm/dev-ubuntu-24.04:7.2.3

docker-build-cpu docker-build-cublas12 docker-build-hipblas: docker-build-%:
	@engine="$$(tests/image/engine.sh)" || exit 1; \
	build="$$engine build"; [ "$$engine" != buildah ] || build="buildah bud"; \
	set -- -f Dockerfile.python -t $(IMAGE_NAME):$* \
	  --build-arg BUILD_PROFILE=$* \
	  --build-arg BASE_IMAGE=$(or $(BASE_IMAGE),$(BASE_IMAGE_$*)) \
	  $(if $(FROM_SOURCE),--build-arg FROM_SOURCE=$(FROM_SOURCE)) \
	  $(DOCKER_BUILD_FLAGS) .; \
	echo "+ $$build $$*"; t0=$$(date +%s); \
	$$build "$$@" || exit 1; \
	echo "docker-build-$*: built $(IMAGE_NAME):$* with $$engine in $$(( $$(date +%s) - t0 ))s"

# Unpacks $(IMAGE) into a temp dir, runs its run.sh (in a Python-less container, or on
# the host) and drives it with tests/image/drive.py; removes the image afterwards unless
# KEEP_IMAGE=1 (see tests/image/test_image.sh).
test-image: install
	tests/image/test_image.sh $(IMAGE)
