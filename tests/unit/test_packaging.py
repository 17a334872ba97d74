"""The package installs into a GPU image beside the image's own torch: the core dependencies take a
floor, not a pin (the exact CPU pin lives in the ``cpu`` extra), and pip's resolver agrees."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _torch(reqs):
    return next(Requirement(r) for r in reqs if Requirement(r).name == "torch")


def test_core_dependencies_accept_other_torch_builds_and_the_cpu_extra_pins_it():
    core = _torch(PROJECT["dependencies"]).specifier
    for version in ("2.6.0", "2.11.0", "2.13.0", "2.13.0+cpu", "2.15.0"):
        assert core.contains(version), version
    # an NGC image's torch is a pre-release build: allowed when pinned by the image's constraint
    assert core.contains("2.11.0a0+4f2a1b9c.nv26.10", prereleases=True)
    assert str(_torch(PROJECT["optional-dependencies"]["cpu"]).specifier) == "==2.13.0"


def test_pip_resolves_the_package_against_a_constraint_of_another_torch(tmp_path):
    """What `pip install` does in an image whose torch is fixed by a constraint (the Dockerfile's
    PIP_CONSTRAINT): a dry run against torch 2.11.0 (the lent GPU machine's), reading metadata
    only, no torch download."""
    constraint = tmp_path / "constraints.txt"
    constraint.write_text("torch==2.11.0\n")
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                        "--report", str(report), "-c", str(constraint), "-e", str(ROOT)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if r.returncode and any(s in r.stderr for s in ("NewConnectionError", "Temporary failure in "
                                                    "name resolution", "Network is unreachable")):
        pytest.skip(f"the package index is unreachable from here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    assert chosen.get("torch") == "2.11.0" and "megatron-rl" in chosen, chosen
