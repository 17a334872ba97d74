# GPU image for clusters: NGC PyTorch (CUDA, NCCL, cuDNN, TransformerEngine and Apex built for
# that torch) + megatron-core + vLLM + this package. Nothing is compiled at run time.
#
#   docker build -t megatron-rl:gpu .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /models:/models -v $PWD/runs:/work/runs \
#     megatron-rl:gpu bash launch/torchrun.sh configs/recipes/qwen3_30b_a3b_8xh100.yaml \
#     model.hf_config=/models/Qwen3-30B-A3B data.path=/models/data/prompts.parquet
#
# The base image fixes torch, and TransformerEngine / Apex are built against it. vLLM's wheels pin
# a different torch, so vLLM is compiled here against the image's torch (vLLM's documented
# `use_existing_torch.py` route), for Hopper only; that is the slow layer (~40 min on 16 cores),
# and it happens once, at build time. Bump BASE_IMAGE and VLLM_VERSION together.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.32.0
# the version CI's Python 3.12 leg tests (make test-py312)
ARG MCORE_VERSION=0.19.2
ARG MAX_JOBS=16

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    TORCH_CUDA_ARCH_LIST="9.0"

# pip may not replace the image's torch (TE and Apex were built for it)
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

WORKDIR /tmp/vllm
RUN git clone --depth 1 --branch "v${VLLM_VERSION}" https://github.com/vllm-project/vllm.git . \
 && python use_existing_torch.py \
 && pip install -r requirements/build.txt \
 && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation . \
 && pip install "megatron-core==${MCORE_VERSION}" \
 && python -c "import transformer_engine, apex, megatron.core, vllm; print('stack ok')"

WORKDIR /opt/megatron_rl
RUN rm -rf /tmp/vllm

# dependencies first (cached across source edits), then the package itself. The package asks for
# torch>=2.6 (not a pin), so pip keeps the image's torch under PIP_CONSTRAINT; its `cpu` extra
# (vLLM's CPU build, torch==2.13.0) is not installed here.
COPY pyproject.toml README.md ./
COPY megatron_rl ./megatron_rl
COPY configs ./configs
COPY launch ./launch
COPY tools ./tools
RUN pip install -e ".[test]" \
 && megatron-rl print-config configs/recipes/qwen3_30b_a3b_8xh100.yaml \
      model.hf_config=configs/models/qwen3_30b_a3b data.path=prompts.jsonl > /dev/null

WORKDIR /work
CMD ["megatron-rl", "--help"]
