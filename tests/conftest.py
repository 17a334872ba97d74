"""Markers every test directory shares. ``vllm``: the test runs the trainer or the engine, which
needs vLLM (on CPU its CPU build, the ``cpu`` extra); where it is not installed (the Python 3.12
CI leg, a GPU box without vLLM) the test is skipped with that reason, never silently."""

import importlib.util

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="needs vLLM, which is not installed here (CPU: pip install -e "
                                   "'.[cpu]'; the Python 3.12 CI leg runs without it)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
