"""Each CPU patch is still needed: without it (and with all the others) one training step fails
with the exact error, in the exact megatron-core function, its docstring names. When one of these
fails, upstream fixed the problem: delete the patch (the list shrinks, never rots)."""

import pytest

from megatron_rl.model.cpu_patches import CPU_PATCHES
from tests.distributed.patch_workers import NEEDS

ALL = [name for world in NEEDS.values() for name in world]


def test_every_patch_has_a_layout_that_proves_it_is_needed():
    assert sorted(ALL) == sorted(CPU_PATCHES)


@pytest.mark.parametrize("name", ALL)
def test_layout_trains_with_every_patch(patch_results, name):
    assert patch_results[f"all:{name}"] == ""


@pytest.mark.parametrize("name", ALL)
def test_upstream_still_fails_without_the_patch(patch_results, name):
    """On the megatron-core versions that need it (``CpuPatch.needed``), the step fails without
    the patch exactly as its docstring says; on the others the patch is left out and the step
    trains, so the detection is right both ways."""
    from importlib.metadata import version

    got, p = patch_results[name], CPU_PATCHES[name]
    if not p.needed():
        assert got == "", f"megatron-core {version('megatron-core')} is said not to need {name!r}: {got}"
        return
    assert got, f"megatron-core {version('megatron-core')} no longer needs the {name!r} CPU patch"
    assert p.explains(got), got
