"""megatron-core distributed checkpoint -> HF safetensors directory (``megatron-rl convert export``).

    python tools/convert_mcore_to_hf.py CKPT OUT_HF_DIR [--tokenizer DIR] [--dtype bf16]
    torchrun --nproc-per-node 8 tools/convert_mcore_to_hf.py CKPT OUT_HF_DIR --tp 2 --ep 4
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "export", *sys.argv[1:]]))
