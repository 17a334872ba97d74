"""Save and resume the whole training state with megatron-core ``dist_checkpointing``.

A checkpoint is ``<root>/step_<N>/``: the model and optimizer (sharded, any TP/PP/EP layout can
load it), the LR scheduler and the trainer's own state (rank 0, JSON), and every rank's RNG
states. It is written to ``<root>/.tmp-step_<N>`` and renamed only when complete, so a crash
mid-save leaves the previous checkpoint as the latest; ``<root>/latest`` names the newest
complete one (replaced atomically; advisory: resume scans the directories); only the last
``keep_last`` are kept. The last file written
is ``manifest.json`` (every file's size and SHA-256, ``manifest.py``), checked before any load: a
truncated or altered file is named instead of loaded. Loading never unpickles arbitrary objects
(``safe_load.py``: torch's metadata through an allowlist, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_rl.checkpoint import manifest as M
from megatron_rl.checkpoint.dcp_scale import scalable_planning
from megatron_rl.checkpoint.hf_io import SIDE_FILES, copy_side_files
from megatron_rl.checkpoint.optim_state import (destination_keeps_adam_step, prime_adam_state,
                                                restore_adam_step, sharding_metadata)
from megatron_rl.checkpoint.safe_load import safe_checkpoint_loads
from megatron_rl.io_errors import WriteFailed, diagnose
from megatron_rl.model.cpu_patches import (checkpoint_reads_without_modes,
                                           in_process_checkpoint_writes)
from megatron_rl.parallel.weight_comm import all_gather_objects
from megatron_rl.runtime.crash_points import reached
from megatron_rl.runtime.model_setup import unwrap
from megatron_rl.runtime.run_lock import new_run_id

CRITIC_DIR = "critic"   # PPO's value model inside a training checkpoint
CRITIC_MARKER = "megatron_rl_critic.json"   # in it: `critic.init_from` takes the head as well


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(), "python": random.getstate()[1],
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    get_cuda_rng_tracker().set_states(state["tracker"])


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def read_latest(root: os.PathLike) -> tuple:
    """What ``<root>/latest`` says: ``(step or None, what is wrong with the pointer or "")``.
    Advisory only: resume scans the ``step_*`` directories (``train.setup.resume_checkpoint``)."""
    f = Path(root) / "latest"
    if not f.is_file():
        return None, f"{f} is missing"
    text = f.read_text(errors="replace").strip()
    if not text.isdigit():
        return None, f"{f}: expected a step number, found {text[:40]!r}"
    return int(text), ""


def checkpoint_steps(root: os.PathLike) -> List[int]:
    """Steps of the ``step_*`` directories under ``root``, newest first (verify before use)."""
    out = []
    for d in Path(root).glob("step_*"):
        tail = d.name[len("step_"):]
        if d.is_dir() and tail.isdigit():
            out.append(int(tail))
    return sorted(out, reverse=True)


def step_dir(root: os.PathLike, step: int) -> Path:
    """The directory of step ``step``'s checkpoint under ``root``."""
    return Path(root) / f"step_{step:08d}"


def _seal(directory: Path, run_id: str) -> None:
    """Collective: hash this rank's share of the files; rank 0 writes the manifest."""
    files = M.checkpoint_files(directory)
    entries = {}
    for part in all_gather_objects(M.digests(directory, M.my_share(files, _rank(), _world()))):
        entries.update(part)
    if _rank() == 0:
        M.write_manifest(directory, entries, run_id)


def verify_checkpoint(path: os.PathLike) -> None:
    """Collective: raises ``CheckpointError`` on every rank (naming the file) unless every file in
    the manifest is present with its size and SHA-256."""
    path = Path(path)
    try:
        expected = M.read_manifest(path)
        local = M.check_files(path, expected, M.my_share(sorted(expected), _rank(), _world()))
    except M.CheckpointError as e:
        local = [f"!{e}"]
    problems = [p for part in all_gather_objects(local) for p in part]
    if problems:
        whole = [p[1:] for p in problems if p.startswith("!")]
        raise M.CheckpointError(whole[0] if whole else M.problem_message(path, problems))
    M.check_one_run(path)


def save_checkpoint(root: os.PathLike, step: int, model, optimizer, scheduler,
                    trainer_state: Dict[str, Any], keep_last: int = 2,
                    optimizer_format: str = "dp_reshardable",
                    layout: Optional[Dict[str, int]] = None, run_id: str = "",
                    critic: Optional[tuple] = None,
                    side_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. ``optimizer_format``:
    see ``optim_state``; ``layout`` (the parallel sizes) is recorded so that a resume under
    another layout can be checked against what the format allows. ``run_id`` (the trainer's;
    a fresh one if empty) names the temporary directory, so no two runs ever write into one,
    and is recorded in ``trainer_state.json`` and the manifest, so a mixed directory fails.
    ``critic``: PPO's ``(model, optimizer, scheduler)``, written to ``critic/`` inside the same
    directory, under the same manifest and rename (one checkpoint, never half of one).
    ``side_files(directory)`` (rank 0, before the seal) adds what export needs beside the
    shards: the HF config and tokenizer."""
    run_id = run_id or all_gather_objects(new_run_id())[0]
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-step_{step:08d}-{run_id}"
    failed = _WriteAgreement(root, tmp, step)
    if _rank() == 0:
        with failed.catch():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    failed.agree()
    reached("checkpoint", step)
    state = {"step": step, "scheduler": scheduler.state_dict(), "trainer": trainer_state,
             "optimizer_format": optimizer_format, "layout": layout, "run_id": run_id}
    if critic is not None:
        state["critic_scheduler"] = critic[2].state_dict()
    with failed.catch():
        _write_state(tmp, model, optimizer, scheduler, state, optimizer_format)
    failed.agree()
    if critic is not None:   # its own directory, made after the policy's (an empty one to save into)
        if _rank() == 0:
            with failed.catch():
                (tmp / CRITIC_DIR).mkdir()
        failed.agree()
        with failed.catch():
            _write_shards(tmp / CRITIC_DIR, critic[0], critic[1], optimizer_format)
            if _rank() == 0:
                (tmp / CRITIC_DIR / CRITIC_MARKER).write_text(
                    json.dumps({"model": "critic", "head": "output_layer"}))
        failed.agree()
    if side_files is not None and _rank() == 0:
        with failed.catch():
            side_files(tmp)
    failed.agree()
    with failed.catch():
        _seal(tmp, run_id)
    failed.agree()
    reached("checkpoint.written", step)
    if _rank() == 0:
        with failed.catch():
            if final.exists():  # one resume skipped as damaged (resume_fallback): kept for a look
                os.replace(final, root / f"{final.name}.replaced-{run_id}")
            os.replace(tmp, final)
            reached("checkpoint.renamed", step)
            pointer = root / ".latest.tmp"
            pointer.write_text(str(step))
            os.replace(pointer, root / "latest")
            reached("checkpoint.latest", step)
            _prune(root, step, keep_last)
    failed.agree()
    return final


def _write_state(tmp: Path, model, optimizer, scheduler, state: Dict[str, Any],
                 optimizer_format: str) -> None:
    """Every rank's shards and RNG states, and (rank 0) the trainer state, into ``tmp``."""
    _write_shards(tmp, model, optimizer, optimizer_format)
    torch.save(_rng_state(), tmp / f"rng_rank{_rank():05d}.pt")
    if _rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state))


def _write_shards(directory: Path, model, optimizer, optimizer_format: str) -> None:
    """One model's and its optimizer's shards as a megatron-core distributed checkpoint."""
    from megatron.core import dist_checkpointing

    prime_adam_state(optimizer)  # a checkpoint before the first update (no Adam state yet)
    # the unwrapped model: the same keys as `save_model`, so either kind loads through `load_model`
    msd = unwrap(model).sharded_state_dict()
    with in_process_checkpoint_writes(), scalable_planning():
        dist_checkpointing.save({"model": msd, "optimizer": optimizer.sharded_state_dict(
            msd, metadata=sharding_metadata(optimizer_format))}, str(directory))


class _WriteAgreement:
    """A save's failure, agreed by every rank at each phase's end (one all-gather, where a plain
    barrier stood), so that all ranks stop together: an I/O failure (full disk, quota, read-only)
    becomes one ``WriteFailed`` line on every rank, the half-written temporary directory is
    removed (its space freed), and the checkpoints before it stay as they were."""

    def __init__(self, root: Path, tmp: Path, step: int):
        self.root, self.tmp, self.step = root, tmp, step
        self.error: Optional[BaseException] = None

    @contextmanager
    def catch(self) -> Iterator[None]:
        """Inside: a failure is kept for ``agree`` instead of raised on this rank alone."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 -- agreed in `agree`, then raised
            self.error = e

    def agree(self) -> None:
        """Collective: every rank raises the first failure any rank kept (one line for an I/O
        error)."""
        mine, io = "", False
        if self.error is not None:
            found = diagnose("checkpoint", self.tmp, self.error, self._after())
            io = found is not None
            mine = str(found) if io else f"rank {_rank()}: {self.error!r}"[:500]
        said = all_gather_objects((io, mine))
        if not any(m for _, m in said):
            return
        if _rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        io_lines = [m for was_io, m in said if was_io]
        if io_lines:
            raise WriteFailed(io_lines[0])
        if self.error is not None:
            raise self.error   # not an I/O failure: a bug keeps its traceback
        raise _Agreed(next(m for _, m in said if m))

    def _after(self) -> str:
        done = [s for s in checkpoint_steps(self.root) if s < self.step]
        kept = f"step_{done[0]:08d} and older checkpoints are" if done else "no checkpoint was"
        return f"{kept} left as they were; free space and rerun the same command to resume"


class _Agreed(RuntimeError):
    """Another rank's failure, raised here so that every rank stops at the same point."""


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Runs right after this run saved ``step``: keep the newest ``keep_last`` checkpoints up to
    it (all of them when ``keep_last`` is 0). A directory beyond ``step`` is never deleted: resume
    takes the newest complete one, so one there is damaged (skipped under resume_fallback) and
    kept for a look. Temporary directories are debris of dead writers (the output directory's
    lock excludes live ones)."""
    steps = [s for s in checkpoint_steps(root) if s <= step]
    for s in steps[keep_last:] if keep_last > 0 else []:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for tmp in root.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: os.PathLike, model, optimizer, scheduler, verify: bool = True,
                    layout: Optional[Dict[str, int]] = None,
                    critic: Optional[tuple] = None) -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` into freshly built objects (collective);
    returns the trainer state saved with it. ``layout``: the parallel sizes loading it, checked
    against the saved ones when the optimizer format cannot reshard. ``critic``: PPO's
    ``(model, optimizer, scheduler)``, loaded from the checkpoint's ``critic/``."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    if not (path / "trainer_state.json").is_file():
        raise M.CheckpointError(f"checkpoint {path}: no trainer_state.json (a weights-only "
                                "directory: give it as model.init_from instead)")
    state = json.loads((path / "trainer_state.json").read_text())
    fmt = state.get("optimizer_format", "dp_reshardable")   # what checkpoints before it used
    _check_resharding(path, fmt, state.get("layout"), layout)
    if critic is not None and not (path / CRITIC_DIR).is_dir():
        raise M.CheckpointError(
            f"checkpoint {path}: holds no critic (written by a run without "
            "algo.advantage.name=gae); resume it with its own algorithm, or start PPO from its "
            "weights in a new train.output_dir (model.init_from, critic.init_from)")
    _load_shards(path, model, optimizer, fmt, "the model and optimizer")
    scheduler.load_state_dict(state["scheduler"])
    if critic is not None:
        _load_shards(path / CRITIC_DIR, critic[0], critic[1], fmt, "the critic and its optimizer")
        critic[2].load_state_dict(state["critic_scheduler"])
    load_rng_state(path)
    return state["trainer"]


def _load_shards(path: Path, model, optimizer, fmt: str, what: str) -> None:
    from megatron.core import dist_checkpointing

    prime_adam_state(optimizer)
    model = unwrap(model)
    msd = model.sharded_state_dict()
    with torch.no_grad():  # the fp32 optimizer copies into views of parameters that need grads
        try:
            with safe_checkpoint_loads(), scalable_planning(), checkpoint_reads_without_modes():
                loaded = dist_checkpointing.load({"model": msd, "optimizer": optimizer.sharded_state_dict(
                    msd, is_loading=True, metadata=sharding_metadata(fmt))}, str(path))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 -- torch's CheckpointException is a BaseException
            raise _load_error(path, e, what) from None
        model.load_state_dict(loaded["model"])
        with destination_keeps_adam_step():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_step(optimizer, loaded["optimizer"])


def _check_resharding(path: Path, fmt: str, saved: Optional[Dict[str, int]],
                      now: Optional[Dict[str, int]]) -> None:
    """What a resume under another layout may change (checked here, in one line, instead of
    failing deep inside the load): ``dp_reshardable`` optimizer state is each rank's flat shard of
    the buffers the DP x CP ranks split, so the DP and CP sizes only (tested: DP 2 -> 1, CP 2 ->
    DP 2); ``fully_reshardable`` state is per parameter, so TP, PP, CP and DP too, but not expert
    parallelism, which changes the optimizer itself (one, or dense + expert chained)."""
    if not saved or not now or saved == now:
        return
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    diff = ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in changed)
    # expert-TP follows TP when EP is 1; with EP > 1 it shapes the expert optimizer (untested)
    experts = "ep" in changed or ("etp" in changed and max(saved.get("ep", 1), now.get("ep", 1)) > 1)
    model_parallel = [k for k in changed if k not in ("dp", "cp")]
    if not experts and (fmt == "fully_reshardable" or not model_parallel):
        return
    hint = ("save with train.optimizer_checkpoint=fully_reshardable to change TP or PP"
            if fmt == "dp_reshardable" and not experts
            else "expert parallelism cannot change across a resume")
    raise M.CheckpointError(
        f"checkpoint {path}: its optimizer state (train.optimizer_checkpoint={fmt}) cannot follow "
        f"this layout change ({diff}); resume with the saved layout, or start from its weights "
        f"alone (model.init_from) with a fresh optimizer; {hint}")


def load_rng_state(path: os.PathLike) -> None:
    """This rank's RNG states as saved with the checkpoint at ``path`` (if it has them). Call it
    again after anything that draws random numbers between the load and the next step (building
    the vLLM engine does), so that a resumed run continues the saved streams exactly."""
    rng = Path(path) / f"rng_rank{_rank():05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))


MODEL_INFO = "megatron_rl_model.json"


def _check_dist_checkpoint(path: Path) -> None:
    if not path.exists():
        raise M.CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise M.CheckpointError(f"{path}: is a file; give a checkpoint directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise M.CheckpointError(f"{path}: a Hugging Face model, not a megatron-core checkpoint; give "
                                "it as model.hf_config, or convert it with `megatron-rl convert import`")
    if not (path / "metadata.json").is_file():
        raise ValueError(f"{path}: not a megatron-core distributed checkpoint (no metadata.json); "
                         "give a directory written by `megatron-rl convert import` or a training "
                         "checkpoint's step_* directory")


def save_model(path: os.PathLike, model, info: Dict[str, Any],
               hf_files: Optional[os.PathLike] = None) -> Path:
    """Weights only (the converter's output; a starting point for training), collective.

    Written to ``.<name>.partial`` beside ``path`` and renamed when complete; ``info`` (the model's
    HF config and where it came from) goes to ``megatron_rl_model.json``, and ``config.json`` with
    the tokenizer / generation files of ``hf_files`` to ``hf/`` (so that export needs nothing
    else). Refuses a non-empty ``path`` before writing anything."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path}: exists and is not empty; choose a new output directory")
    tmp = path.with_name(f".{path.name}.partial")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with in_process_checkpoint_writes(), scalable_planning():
        dist_checkpointing.save({"model": unwrap(model).sharded_state_dict()}, str(tmp))
    if _rank() == 0:
        (tmp / MODEL_INFO).write_text(json.dumps(info, indent=2))
        if hf_files is not None:
            (tmp / "hf").mkdir()
            copy_side_files(hf_files, tmp / "hf", ("config.json", *SIDE_FILES))
    _barrier()
    _seal(tmp, "")
    if _rank() == 0:
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    _barrier()
    return path


def model_info(path: os.PathLike) -> Optional[Dict[str, Any]]:
    """What ``save_model`` recorded (None for a training checkpoint)."""
    f = Path(path) / MODEL_INFO
    return json.loads(f.read_text()) if f.is_file() else None


def load_model(path: os.PathLike, model, skip: tuple = ()) -> None:
    """The weights of a ``save_model`` or ``save_checkpoint`` directory into ``model`` (any
    layout: megatron-core reshards), collective. A checkpoint of another shape is a ``ValueError``.
    ``skip``: name prefixes neither loaded nor required (a critic's head from a policy's trunk)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    check_model_checkpoint(path)
    model = unwrap(model)  # a DDP wrapper's state dict keys say "module."
    wanted = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith(skip)} \
        if skip else model.sharded_state_dict()
    try:
        with safe_checkpoint_loads(), scalable_planning(), checkpoint_reads_without_modes():
            loaded = dist_checkpointing.load({"model": wanted}, str(path))
        model.load_state_dict(loaded["model"], strict=not skip)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 -- torch's CheckpointException is a BaseException
        raise _load_error(path, e, "the model") from None


def load_model_part(path: os.PathLike, model, local_names, reader=None) -> None:
    """The tensors of ``model`` whose state-dict names are in ``local_names`` from a checkpoint
    ``load_model`` takes (any layout); the rest of ``model`` may be on the meta device. Local to
    this rank (``partial_load``). The caller has checked the directory
    (``check_model_checkpoint``) once: this runs per segment of a streaming export. ``reader``: a ``CheckpointReader`` of
    ``path`` to reuse across calls."""
    from megatron_rl.checkpoint.partial_load import CheckpointReader, model_boxes, read_boxes

    model = unwrap(model)
    wanted = {k: v for k, v in model.sharded_state_dict().items() if k in local_names}
    unmapped = sorted(set(local_names) - set(wanted))
    if unmapped:  # left unloaded they would export uninitialised memory
        raise ValueError(f"{path}: no checkpoint entry for {', '.join(unmapped[:3])}: this "
                         "model cannot be exported in segments; export without streaming")
    try:
        boxes, merge = model_boxes(wanted)
        with safe_checkpoint_loads(), scalable_planning(), checkpoint_reads_without_modes():
            read_boxes(reader or CheckpointReader(path), boxes)
        model.load_state_dict(merge(), strict=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 -- torch's CheckpointException is a BaseException
        if "can't allocate memory" in str(e):
            raise MemoryError(f"checkpoint {path}: out of host memory loading one segment of "
                              "the model (of one decoder layer)") from None
        raise _load_error(Path(path), e, "the model") from None


def check_model_checkpoint(path: Path) -> None:
    """What ``load_model`` requires of ``path`` before reading: a megatron-core checkpoint (not,
    say, an HF directory) whose manifest checks out."""
    _check_dist_checkpoint(path)
    verify_model_dir(path)


def verify_model_dir(path: Path) -> None:
    """``verify_checkpoint`` of a weights directory; a training checkpoint's ``critic/`` is
    covered by its step directory's manifest."""
    verify_checkpoint(path.parent if (path / CRITIC_MARKER).is_file() else path)


def _load_error(path: Path, e: BaseException, what: str) -> M.CheckpointError:
    text = str(e)
    for marker in ("refused to unpickle", "Weights only load failed", "Unsupported global"):
        if marker in text:
            line = next(ln.strip() for ln in text.splitlines() if marker in ln)
            return M.CheckpointError(f"checkpoint {path}: holds objects that loading would have to "
                                     f"execute, not load ({line[:300]}); never load it")
    return M.CheckpointError(f"checkpoint {path}: does not fit {what} built from the config "
                             f"({_last_line(e)[:300]})")


def _last_line(e: BaseException) -> str:
    """The root cause of a (possibly nested, multi-rank) checkpoint error, on one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
