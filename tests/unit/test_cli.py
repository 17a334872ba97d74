"""``megatron-rl convert`` and ``eval``: bad input ends in one line on stderr and exit status 2."""

import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_rl", *args], capture_output=True,
                          text=True, timeout=300)


def test_convert_of_a_missing_directory_is_one_line_and_status_2(tmp_path):
    r = _cli("convert", "import", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron-rl")]
    assert lines == [f"megatron-rl: error: {tmp_path / 'nope'}: not a directory (give a Hugging "
                     "Face model directory)"], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_convert_usage_errors_name_the_flag(tmp_path):
    r = _cli("convert", "import", str(tmp_path), str(tmp_path / "o"), "--tp", "two")
    assert r.returncode == 2 and "--tp" in r.stderr and "invalid int value" in r.stderr


def test_eval_bad_arguments_are_one_line_and_status_2(tmp_path):
    recipe = "configs/recipes/tiny_moe_gspo.yaml"
    r = _cli("eval", "--config", recipe, "--model", str(tmp_path), "--n", "4")
    assert r.returncode == 2 and "greedy decode" in r.stderr and "Traceback" not in r.stderr
    r = _cli("eval", "--config", recipe, "--model", str(tmp_path), "--temperature", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path}: not a Hugging Face model directory (no config.json)" in r.stderr


def test_convert_import_verifies_against_transformers_and_says_so(tmp_path):
    import json

    from megatron_rl.model.tiny import write_tiny_hf_model

    hf = tmp_path / "hf"
    write_tiny_hf_model("qwen3", hf, seed=1)
    r = _cli("convert", "import", str(hf), str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "verified: max |logit diff| vs transformers" in r.stdout, r.stdout
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, my_extension=3)))
    r = _cli("convert", "import", str(hf), str(tmp_path / "c"))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron-rl")]
    assert r.returncode == 2 and len(lines) == 1 and "my_extension=3" in lines[0], r.stderr
    assert not (tmp_path / "c").exists()
    r = _cli("convert", "import", str(hf), str(tmp_path / "c"), "--allow-unknown-config-keys",
             "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "ignored config.json keys my_extension=3" in r.stdout, r.stdout
    assert "not verified (--no-verify)" in r.stdout, r.stdout


def test_flags_may_sit_among_overrides_and_recipes_resolve_by_name(capsys):
    import pytest

    from megatron_rl.cli import main

    assert main(["print-config", "tiny_moe_ppo", "train.steps=7", "train.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "output_dir: runs/tiny_moe_ppo" in out
    with pytest.raises(SystemExit):
        main(["print-config", "tiny_moe_ppo", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
