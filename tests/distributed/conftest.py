import pytest

from tests.distributed import workers
from tests.distributed.harness import spawn


@pytest.fixture(scope="session")
def loss_results():
    """One 8-process spawn runs every loss-equivalence check; tests read their figures."""
    return spawn(workers.loss_equivalence, 8)


@pytest.fixture(scope="session")
def convention_results():
    return spawn(workers.conventions, 4)
