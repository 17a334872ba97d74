"""HF safetensors directory -> megatron-core distributed checkpoint (``megatron-rl convert import``).

    python tools/convert_hf_to_mcore.py HF_DIR OUT_CKPT [--tp N --pp N --ep N --etp N] [--dtype D]
        [--no-verify] [--allow-unknown-config-keys]
    torchrun --nproc-per-node 8 tools/convert_hf_to_mcore.py HF_DIR OUT_CKPT --tp 2 --ep 4
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "import", *sys.argv[1:]]))
