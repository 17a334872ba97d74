"""Hugging Face weights into and out of a (sharded) megatron-core ``GPTModel``.

``load_hf_weights``: every rank fills its own parameters from the HF files: for each local tensor
it reads the HF tensors it is made of, fuses them into the whole megatron tensor and keeps this
rank's TP / expert-TP shard. One whole tensor at a time is in memory.

``iter_hf_weights``: the other direction, for any TP / PP / EP layout. Every rank holds the same
plan (the global tensors, their shapes and owners, from one metadata all-gather); for each tensor
the owner ranks gather the TP shards, the first owner sends the whole tensor on (to ``dst``, or to
every rank), and the receiver yields its HF tensors. One whole tensor (``iter_hf_buckets``: one
bucket) is held at a time: the model is never gathered on one rank.

Global names: a local ``decoder.layers.i`` is the layer's ``layer_number - 1`` (the pipeline
offset), a local expert ``j`` is ``ep_rank * experts_per_rank + j``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch

from megatron_rl.checkpoint.hf_io import HFReader
from megatron_rl.checkpoint.hf_mapping import Mapping, Rule, shard, unshard, whole_shape
from megatron_rl.parallel.groups import ShardGroups
from megatron_rl.parallel.collectives import Group, group_rank, group_size
from megatron_rl.parallel.weight_comm import all_gather_objects, gather_pieces, move_whole

Tensor = torch.Tensor


@dataclass
class LocalTensor:
    """A parameter shard this rank holds, with its global name, rule and split group."""
    local_name: str
    name: str               # global megatron name
    tensor: Tensor
    rule: Rule
    index: Dict[str, int]   # {"L": layer, "E": expert} as the rule's placeholders
    group: Group            # the TP group its split runs over

    @property
    def whole_shape(self) -> Tuple[int, ...]:
        """The shape of the whole tensor this shard is part of."""
        return whole_shape(self.tensor.shape, self.rule.split, group_size(self.group))


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.weight)(\d+)$")


def local_tensors(model, mapping: Mapping, groups: ShardGroups, num_experts: int) -> List[LocalTensor]:
    """This rank's tensors (parameters and persistent buffers such as the router's expert bias)
    with their global names and rules. ``model``: one unwrapped ``GPTModel`` chunk."""
    decoder = getattr(model, "decoder", None)
    layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)} if decoder else {}
    per_rank = num_experts // groups.ep_size if num_experts else 0
    first = groups.ep_rank * per_rank
    out = []
    for local, t in model.state_dict(keep_vars=True).items():
        if local.endswith("_extra_state") or not isinstance(t, Tensor):
            continue
        name = _LAYER.sub(lambda m: f"decoder.layers.{layer_of[int(m[1])]}.", local)
        expert = ".mlp.experts." in name
        if expert:
            name = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{first + int(m[1])}.", name)
            name = _GROUPED_EXPERT.sub(lambda m: f"{m[1]}{first + int(m[2])}", name)
        rule, index = mapping.match(name)
        out.append(LocalTensor(local, name, t, rule, index, groups.etp if expert else groups.tp))
    return out


def expected_hf_names(entries: List[LocalTensor]) -> Set[str]:
    """Every HF tensor name the shards in ``entries`` map to."""
    return {n for e in entries for n in e.rule.hf_names(**e.index)}


def _check_hf_shapes(reader: HFReader, mapping: Mapping, e: LocalTensor, names: List[str]) -> None:
    want = mapping.to_hf(e.rule, torch.empty(e.whole_shape, device="meta"))
    for n, w in zip(names, want):
        found = reader.shape(n)
        if list(w.shape) != found:
            raise ValueError(f"{n}: shape {found} in the checkpoint, but the config needs "
                             f"{list(w.shape)} (for megatron {e.name}); does config.json belong "
                             f"to these weights?")


@torch.no_grad()
def load_hf_weights(model, reader: HFReader, mapping: Mapping, groups: ShardGroups,
                    num_experts: int) -> Set[str]:
    """Fill this rank's tensors from ``reader``; returns the HF names this rank read. Raises
    ``ValueError`` naming every missing HF tensor, or the first one whose shape disagrees."""
    entries = local_tensors(model, mapping, groups, num_experts)
    needed = expected_hf_names(entries)
    missing = sorted(n for n in needed if n not in reader.weight_map)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{reader.dir}: missing {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing[:5])}{more}")
    for e in entries:
        names = e.rule.hf_names(**e.index)
        _check_hf_shapes(reader, mapping, e, names)
        whole = mapping.to_mcore(e.rule, [reader.get(n) for n in names])
        piece = shard(whole, e.rule.split, group_rank(e.group), group_size(e.group))
        e.tensor.copy_(piece)
    return needed


def _order_key(mapping: Mapping, name: str):
    """Embedding first, then layer by layer (experts in order inside), final norm, output layer."""
    _, index = mapping.match(name)
    head = 0 if name.startswith("embedding") else 1 if name.startswith("decoder.layers") else 2
    return (head, index.get("L", 0), index.get("E", -1), name)


def hf_plan(model, mapping: Mapping, groups: ShardGroups, num_experts: int):
    """Every rank's view of every global tensor: ``[(name, shape, dtype, owners)]`` in export
    order, plus this rank's local entries by name. Collective (one metadata all-gather)."""
    import torch.distributed as dist

    entries = local_tensors(model, mapping, groups, num_experts)
    me = dist.get_rank() if dist.is_initialized() else 0
    mine = [(e.name, e.whole_shape, str(e.tensor.dtype).replace("torch.", "")) for e in entries]
    owners: Dict[str, List[int]] = {}
    meta: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for items in all_gather_objects((me, mine)):
        for name, shape, dtype in items[1]:
            owners.setdefault(name, []).append(items[0])
            meta[name] = (tuple(shape), dtype)
    plan = [(n, meta[n][0], getattr(torch, meta[n][1]), sorted(owners[n]))
            for n in sorted(owners, key=lambda n: _order_key(mapping, n))]
    return plan, {e.name: e for e in entries}


def hf_layout(plan, mapping: Mapping, dtype: torch.dtype) -> List[Tuple[str, Tuple[int, ...],
                                                                       torch.dtype]]:
    """The HF tensors ``iter_hf_weights`` yields for ``plan`` (``hf_plan``'s), in its order, as
    ``(name, shape, dtype)``: the mapping applied to meta tensors (no data, no communication)."""
    out = []
    for name, shape, _, _ in plan:
        rule, index = mapping.match(name)
        if rule.tied:
            continue
        whole = torch.empty(shape, device="meta")
        for hf_name, t in zip(rule.hf_names(**index), mapping.to_hf(rule, whole)):
            out.append((hf_name, tuple(t.shape), dtype))
    return out


@torch.no_grad()
def iter_hf_weights(model, mapping: Mapping, groups: ShardGroups, num_experts: int,
                    dst: Optional[int] = None, planned=None) -> Iterator[Tuple[str, Tensor]]:
    """``(hf_name, tensor)`` for every HF tensor of the model, on global rank ``dst`` (or on every
    rank when None). Collective: every rank must iterate it to the end. ``planned``: ``hf_plan``'s
    result when the caller has it already (it is collective)."""
    plan, local = planned or hf_plan(model, mapping, groups, num_experts)
    device = next(iter(local.values())).tensor.device if local else torch.device("cpu")
    for name, shape, dtype, owners in plan:
        e = local.get(name)
        whole = unshard(gather_pieces(e.tensor, e.group), e.rule.split) if e else None
        whole = move_whole(whole, shape, dtype, device, src=owners[0], dst=dst)
        if whole is None:
            continue
        rule, index = mapping.match(name)
        if rule.tied:  # the output layer of tied embeddings is the input embedding
            continue
        for hf_name, t in zip(rule.hf_names(**index), mapping.to_hf(rule, whole)):
            yield hf_name, t


def iter_hf_buckets(weights: Iterator[Tuple[str, Tensor]],
                    bucket_bytes: int) -> Iterator[List[Tuple[str, Tensor]]]:
    """Group ``iter_hf_weights`` into lists of at most ``bucket_bytes`` (a tensor larger than a
    bucket is a bucket of its own): the weight sync's peak extra memory is one bucket."""
    bucket: List[Tuple[str, Tensor]] = []
    size = 0
    for name, t in weights:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t.detach().clone()))
        size += n
    if bucket:
        yield bucket
