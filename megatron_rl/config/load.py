"""Load a recipe: YAML files chained by ``defaults:``, then ``key=value`` overrides, into a
validated ``RunConfig``. Every failure is a one-line ``ConfigError`` naming the file or override
and the key path.

A recipe names its parents in ``defaults: [parent.yaml, ...]`` (paths relative to the recipe,
``.yaml`` optional, or the name of a shipped recipe); parents merge first, in order, and the
recipe's own keys win.
``train.output_dir`` is never inherited: unless the recipe itself (or an override) sets it, it
is ``runs/<the recipe's file name>``.
"""

from __future__ import annotations

import difflib
import pathlib
from typing import List, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_rl.fields import ConfigError
from megatron_rl.config.run import RunConfig, validate

PathLike = Union[str, pathlib.Path]


def load_config(recipe: PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated ``RunConfig`` of ``recipe`` with ``overrides`` (``a.b=value``) applied."""
    cfg = OmegaConf.structured(RunConfig)
    chain = _chain(pathlib.Path(recipe), name=str(recipe))
    for path, data in chain:
        cfg = _merge(cfg, data, f"{path}")
    own_dir = _sets_output_dir(chain[-1][1]) or any(
        item.partition("=")[0].strip() == "train.output_dir" for item in overrides)
    if not own_dir:   # a parent's output_dir would resume (or refuse) the parent's run
        cfg.train.output_dir = f"runs/{chain[-1][0].stem}"
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), f"override {item!r}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}; set them in the recipe "
                          "or as key=value")
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` and checkpoints record)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _chain(path: pathlib.Path, seen: tuple = (), name: str = "") -> List[tuple]:
    """``[(file, mapping), ...]`` parents first; the ``defaults`` key removed."""
    path = _resolve(path, name)
    if path in seen:
        raise ConfigError(f"{path}: defaults chain loops back to itself ({' -> '.join(map(str, seen + (path,)))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read recipe ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    parents = data.pop("defaults", []) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: defaults must be a list of recipe paths")
    out = []
    for parent in parents:
        out += _chain(path.parent / parent, seen + (path,), parent)
    return out + [(path, data)]


def _sets_output_dir(data) -> bool:
    train = data.get("train") if isinstance(data, dict) else None
    return isinstance(train, dict) and "output_dir" in train


# the shipped recipes (package data, so a wheel install has them; the repository's
# configs/recipes links here), found by name (`--config tiny_moe_gspo`) from any directory
RECIPES = pathlib.Path(__file__).resolve().parents[1] / "recipes"


def _resolve(path: pathlib.Path, name: str = "") -> pathlib.Path:
    """``path`` (``.yaml`` optional); else, for a bare ``name`` (the command line's recipe, or a
    ``defaults:`` entry), the shipped recipe of that name."""
    candidates = [path, path.with_name(path.name + ".yaml")]
    if name and len(pathlib.Path(name).parts) == 1:
        candidates += [RECIPES / name, RECIPES / (name + ".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = sorted(p.stem for p in RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []
    raise ConfigError(f"{path}: recipe not found (a path, or one of {', '.join(known)})")


# keys of earlier versions: what replaced them
RETIRED = {
    "train.tensorboard": "use train.loggers (default [tensorboard]; [] logs to none)",
    "train.trackers": "use train.loggers, e.g. train.loggers=[tensorboard,wandb]",
    "model.kind": "every run is the Megatron trainer now (the toy trainer is retired); delete it",
    "toy": "the toy trainer is retired; start from the tiny_moe_gspo recipe",
    "model.routing_replay": "use train.routing_replay: off | old (true was this: replay the old-"
                            "policy pass's routes) | rollout (replay the engine's routes)",
}


def _parse_override(item: str) -> DictConfig:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-6")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {_first_line(e)}") from None


def _merge(cfg: DictConfig, data, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, data)
    except ConfigKeyError as e:
        key = _key_path(e)
        if key in RETIRED:
            raise ConfigError(f"{source}: {key} is gone: {RETIRED[key]}") from None
        raise ConfigError(f"{source}: unknown key {key}{_suggest(cfg, e)}") from None
    except ValidationError as e:
        raise ConfigError(f"{source}: {_key_path(e)}: {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_key_path(e)}: {_first_line(e)}") from None


def _key_path(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _suggest(cfg: DictConfig, e: ConfigKeyError) -> str:
    """`` (did you mean 'x'?)`` from the keys that exist beside the unknown one."""
    full = _key_path(e).split(".")
    node = cfg
    for part in full[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig):
        return ""
    near = difflib.get_close_matches(full[-1], [str(k) for k in node.keys()], n=1)
    known = ", ".join(str(k) for k in node.keys())
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"{hint}; known keys there: {known}"
