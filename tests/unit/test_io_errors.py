"""A failed write is said in one line naming the path and the errno, wherever the errno hides;
anything that is not an I/O failure keeps its own exception and traceback."""

import errno
import json

import pytest

from megatron_rl.io_errors import WriteFailed, diagnose, reported_writes


def _buried(err: OSError) -> BaseException:
    """How megatron-core's writer reports it: a RuntimeError raised while handling the OSError."""
    try:
        try:
            raise err
        except OSError:
            raise RuntimeError("Worker failure: unexpected pos 704 vs 598")
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("code,name", [(errno.ENOSPC, "ENOSPC"), (errno.EDQUOT, "EDQUOT"),
                                       (errno.EROFS, "EROFS"), (errno.EACCES, "EACCES")])
def test_the_errno_is_found_in_the_exception_chain(tmp_path, code, name):
    failed = diagnose("checkpoint", tmp_path, _buried(OSError(code, "x")), "step_2 is intact")
    assert isinstance(failed, WriteFailed)
    line = str(failed)
    assert line.startswith(f"writing checkpoint to {tmp_path} failed: ") and f"({name})" in line
    assert line.endswith("; step_2 is intact") and "\n" not in line


def test_the_errno_is_found_in_torchs_per_rank_failures(tmp_path):
    class CheckpointException(BaseException):
        def __init__(self, failures):
            self.failures = failures

    exc = CheckpointException({3: (OSError(errno.ENOSPC, "full"), "traceback text")})
    assert "(ENOSPC)" in str(diagnose("checkpoint", tmp_path, exc))


def test_without_an_errno_a_probe_write_reproduces_it(tmp_path, monkeypatch):
    import megatron_rl.io_errors as io

    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    failed = diagnose("checkpoint", tmp_path, RuntimeError("unexpected pos 704 vs 598"))
    assert "No space left on device (ENOSPC)" in str(failed)
    assert list(tmp_path.iterdir()) == []   # the probe cleans up


def test_a_failure_that_is_not_io_passes_through_unchanged(tmp_path):
    with pytest.raises(KeyError, match="bug"):
        with reported_writes("metrics", tmp_path):
            raise KeyError("bug")


def test_a_full_disk_while_logging_metrics_is_one_line(tmp_path):
    from megatron_rl.observe import RunLog

    log = RunLog(tmp_path, 3, config_yaml="a: 1\n", tensorboard=False, quiet=True)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    log.jsonl = Full()
    with pytest.raises(WriteFailed) as e:
        log.log(1, {"reward/mean": 0.5})
    assert f"writing metrics to {tmp_path / 'metrics.jsonl'} failed: No space left" in str(e.value)
    log.close()   # closing after a failed write does not raise again
    assert json.loads((tmp_path / "run_info.json").read_text())


def test_a_rust_io_error_from_safetensors_is_recognised_by_its_os_error_number(tmp_path):
    """safetensors raises ``SafetensorError`` ("... No space left on device (os error 28)"), not
    an OSError: the full disk is still named, not re-raised as a traceback."""
    from megatron_rl.io_errors import diagnose

    class SafetensorError(Exception):
        pass

    exc = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "(ENOSPC)" in str(diagnose("weights", tmp_path, exc))
    assert diagnose("weights", tmp_path, SafetensorError("bad header (os error 2)")) is None
