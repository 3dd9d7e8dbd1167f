# mildnet: `make demo` runs the main job end to end, `make test` runs the whole suite. Both set up everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
# torch's build helpers need the toolkit's real folder, not the nvcc symlink's (see docs). nvcc may also be a
# wrapper script (it is here), so ask nvcc itself: its dry run prints "#$ TOP=<toolkit>/bin/..".
NVCC := $(shell command -v nvcc 2>/dev/null)
export CUDA_HOME ?= $(if $(NVCC),$(shell $(NVCC) -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's|^\#\$$ TOP=\(.*\)/bin/\.\.$$|\1|p'),)
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export MAX_JOBS ?= 2
KERNEL_SOURCES := $(shell find kernels -type f 2>/dev/null) setup.py
PYTEST_ARGS ?=

.PHONY: all venv build cmake-test browser test demo demo-record serve model_repository ui loadtest bench clean help
all: build

help:
	@echo "make demo   - set up, train briefly, export, serve, index, query, load-test, summary"
	@echo "make test   - set up, build (C++ + CUDA where nvcc exists), ctest, pytest"
	@echo "make model_repository CHECKPOINT=.. - export a checkpoint into model_repository (build output)"
	@echo "make serve  - start Triton on model_repository (127.0.0.1)"
	@echo "make ui     - the search page (127.0.0.1:8090) in front of a running Triton (UI_ARGS=--url ...)"
	@echo "make bench  - run the benchmarks under bench/ (JSON in bench/results/)"

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@
venv: $(DEPS_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(KERNEL_SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@
build: $(BUILD_STAMP)

cmake-test: $(BUILD_STAMP)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(PY)
	cmake --build build/cmake -j $(MAX_JOBS)
	cd build/cmake && ctest --output-on-failure

# The search page's tests drive a real browser: Debian's chromium + its driver, installed when missing.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium chromium-driver; }

test: cmake-test browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole journey on real data (client/demo.py): data, weights, triplets, a short training, export, Triton,
# index, queries, results page + summary (work/demo/), a short load test. Reruns reuse what is done.
DEMO_ARGS ?=
demo: $(BUILD_STAMP)
	$(PY) client/demo.py $(DEMO_ARGS)

# The demo, also recording its figures (bench/results/demo.json, docs/img/demo_query.png) for docs/results.md.
demo-record: $(BUILD_STAMP)
	$(PY) client/demo.py --record $(DEMO_ARGS)
	$(PY) bench/report.py

serve: $(BUILD_STAMP)
	$(PY) -m mildnet serve --repository model_repository

# model_repository/ is build output (gitignored): `mildnet export` renders every model of it from the serving
# contract (mildnet/serving/templates/). CHECKPOINT: a training run's best.pt (e.g. the demo's under work/demo/).
CHECKPOINT ?=
model_repository: $(BUILD_STAMP)
	@test -n "$(CHECKPOINT)" || { echo "usage: make model_repository CHECKPOINT=path/to/best.pt"; exit 2; }
	$(PY) -m mildnet export --checkpoint $(CHECKPOINT) --repository model_repository

# The search page in front of a running Triton (`make serve`): http://127.0.0.1:8090/ by default.
UI_ARGS ?=
ui: $(BUILD_STAMP)
	$(PY) -m mildnet ui $(UI_ARGS)

# Every benchmark (JSON in bench/results/), then docs/results.md and the README headline from them.
bench: $(BUILD_STAMP)
	for b in bench/*.py; do [ $$b = bench/report.py ] || $(PY) $$b || exit 1; done
	$(PY) bench/report.py

clean:
	rm -rf build *.egg-info mildnet/*.so $(BUILD_STAMP)

# Load test of a RUNNING server (start one with `make serve`): headless locust, HTTP + gRPC users, real photos.
# Reports: bench/results/locust/loadtest_{stats,failures,stats_history}.csv and report.html.
LOADTEST_TIME ?= 60s
LOADTEST_USERS ?= 8
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_GRPC ?= 127.0.0.1:8001
LOADTEST_IMAGES ?= ../shared/data/grocery/dataset/val
loadtest: $(DEPS_STAMP)
	mkdir -p bench/results/locust
	$(VENV)/bin/locust -f client/locustfile.py --headless --web-host 127.0.0.1 \
	  -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) -t $(LOADTEST_TIME) --stop-timeout 10 \
	  --host $(LOADTEST_HOST) --grpc-host $(LOADTEST_GRPC) --images $(LOADTEST_IMAGES) \
	  --csv bench/results/locust/loadtest --html bench/results/locust/report.html --only-summary
