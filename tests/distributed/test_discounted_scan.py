"""GAE and discounted returns under context parallelism equal the single-process estimators."""

import pytest

from tests.distributed.harness import spawn


@pytest.fixture(scope="module")
def scan_results():
    from tests.distributed import scan_workers

    return spawn(scan_workers.scan_equivalence, 4)


@pytest.mark.parametrize("case", ["returns", "gae", "gae_gamma1"])
@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("cp", [2, 4])
def test_discounted_scan_under_cp_equals_the_whole_sequence_estimator(scan_results, case, layout, cp):
    err = scan_results[f"{case}|{layout}|cp{cp}"]
    assert err <= 1e-12, f"{case} at CP {cp} ({layout}) differs by {err:.2e}"
