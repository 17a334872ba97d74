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
    got, p = patch_results[name], CPU_PATCHES[name]
    assert got, f"megatron-core no longer needs the {name!r} CPU patch: remove it"
    assert p.error in got and got.endswith(f"@ {p.where}"), got
