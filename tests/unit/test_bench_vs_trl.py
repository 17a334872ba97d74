"""bench/vs_trl.py without TRL installed: it says so, with the command that installs it, and exits
0 before building anything (TRL is not a dependency of ours)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "bench" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_trl_the_benchmark_says_how_to_install_it_and_exits_0(tmp_path, monkeypatch, capsys):
    mod = _module()
    monkeypatch.setattr(mod, "TRL_VENV", tmp_path / "no-venv")
    monkeypatch.delenv("MEGATRON_RL_TRL_PYTHON", raising=False)
    monkeypatch.setattr(mod, "_workload", lambda d: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.setattr(sys, "argv", ["vs_trl.py"])
    mod.main()
    out = capsys.readouterr().out
    assert out.startswith("skipped: no TRL install found"), out
    assert "python bench/vs_trl.py --make-venv" in out


def test_a_given_trl_python_is_used_before_the_default_venv(tmp_path, monkeypatch):
    mod = _module()
    py = tmp_path / "python"
    py.write_text("")
    monkeypatch.setattr(mod, "TRL_VENV", tmp_path / "no-venv")
    assert mod._trl_python(str(py)) == str(py)
    monkeypatch.setenv("MEGATRON_RL_TRL_PYTHON", str(py))
    assert mod._trl_python(None) == str(py)
    monkeypatch.delenv("MEGATRON_RL_TRL_PYTHON")
    assert mod._trl_python(str(tmp_path / "missing")) == ""
