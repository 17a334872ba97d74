"""Every Python example in docs/api.md runs as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_api_doc_has_one_example_per_registry():
    text = "".join(BLOCKS)
    for registry in ("KL_ESTIMATORS", "ADVANTAGE_ESTIMATORS", "RATIO_KINDS", "WEIGHT_FUNCTIONS",
                     "POLICY_LOSSES", "dynamic_sampling_keep"):
        assert registry in text, registry


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_api_doc_example_runs(code, capsys):
    exec(compile(code, str(DOC), "exec"), {})
    assert capsys.readouterr().out
