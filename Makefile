# fastspike: `make test` and `make demo` set up everything on a fresh machine:
# a .venv with torch (from requirements-dev.txt), the extension with its CUDA
# kernels for sm_80 and sm_90 wherever nvcc is found, then run.
# PYTHON=/path/to/python uses an existing interpreter and its packages instead
# (a GPU box has no internet): nothing is installed but the extension itself.

VENV := .venv
PYTHON ?= $(VENV)/bin/python
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
MAX_JOBS ?= 2
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

# Build the CUDA kernels whenever nvcc is there, even with no GPU in sight.
ifneq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
  ifneq ($(FASTSPIKE_USE_CUDA),0)
    export FASTSPIKE_FORCE_CUDA ?= 1
  endif
endif

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h') setup.py fastspike/_build.py
BUILD_STAMP := build/.extension-$(subst /,_,$(PYTHON)).stamp

ifeq ($(PYTHON),$(VENV)/bin/python)
ENV_STAMP := $(VENV)/.installed
else
ENV_STAMP :=
endif

.PHONY: all env build wheel test demo bench sanitize clean

all: build

env: $(ENV_STAMP)

$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(SOURCES) $(ENV_STAMP)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e . 
	mkdir -p build && touch $@

# A wheel of the extension built above (no second compile: FASTSPIKE_PREBUILT=1
# packages fastspike/_C*.so) with the kernel headers and benchmark scripts the
# package reads at run time; tests/test_wheel.py installs it in a fresh venv.
wheel: build
	rm -rf dist && FASTSPIKE_PREBUILT=1 $(PYTHON) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .

test: wheel
	$(PYTHON) -m pytest -q tests

# The main job: train, convert and evaluate on digits and synthetic scenes
# (a few minutes on two cores); table, demo-results/demo.json and demo.png.
demo: build
	$(PYTHON) -m fastspike demo --out demo-results

# The CPU operators built with AddressSanitizer + UBSan into build/sanitize/
# (never fastspike/_C*.so) and the operator, converter, fuzz and hardening
# tests run against them; `tools/sanitize.sh gpu` adds compute-sanitizer on a GPU box.
sanitize: env
	PYTHON=$(PYTHON) tools/sanitize.sh cpu

bench: build
	$(PYTHON) benchmarks/bench_neurons.py

clean:
	rm -rf build dist fastspike/_C*.so *.egg-info demo-results
