"""DTensor activations (tensor and sequence parallelism): moved through their local shard.

A DTensor (`torch.distributed.tensor`) holds this rank's data in one plain local tensor, its
shard, and describes the global tensor in its spec (device mesh, placements, global shape and
stride). Its own storage is an empty placeholder. The runtime keeps, offloads or recomputes the
shard like any activation and gives autograd back a DTensor built from the shard and the saved
spec: the same mesh, placements, shape, stride and dtype, and the same bytes.

- Rule 4 (identity) keys a DTensor on its shard's storage: a DTensor and its views (a
  transpose, the `from_local` view of a plain tensor) are moved once.
- Rule 5 (in-place) reads the DTensor's own version counter, which in-place DTensor ops bump
  (the shard's does not move: the local op runs below autograd), as autograd itself does.
- Rule 6 (filters) looks at the shard: a DTensor parameter's shard storage is a parameter
  storage; the shard must be a plain strided tensor on the compute device.

Recompute needs nothing of its own on the CPU: DTensor's random ops draw from the local
generator there. On CUDA its RNG tracker keeps its offsets in the device generator's state,
which the replay restores (Rule 7), so dropout replays exactly too.

Ranks of one mesh must also recompute the same regions, since a replay runs the region's
collectives again: under policy="auto" the ranks of the meshes an activation was saved on
plan under their smallest budget and all run the first rank's plan (`smallest_over`,
`first_rank_value`; measured times differ between ranks, and so could their plans).

`torch.distributed.tensor` is never imported here: a DTensor exists only once it was, so a
process that never made one never loads it.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

import torch


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _dtensor_class() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local_shard(t: torch.Tensor) -> torch.Tensor | None:
    """The local tensor holding a DTensor's data on this rank; None for any other tensor."""
    if type(t) in _PLAIN:  # the common cases, asked for every saved tensor
        return None
    cls = _dtensor_class()
    if cls is None or not isinstance(t, cls):
        return None
    return t._local_tensor


def data_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds `t`'s bytes: a DTensor's local shard, else `t`."""
    shard = local_shard(t)
    return t if shard is None else shard


def storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage holding `t`'s bytes (a DTensor's shard's, not its empty placeholder)."""
    return data_of(t).untyped_storage()


def spec_of(t: torch.Tensor) -> Any:
    """A DTensor's spec (mesh, placements, global shape and stride), None for other tensors."""
    return None if local_shard(t) is None else t._spec


def rebuild(local: torch.Tensor, spec: Any) -> torch.Tensor:
    """`local` as the DTensor `spec` describes, or `local` itself when `spec` is None.

    The internal constructor, not `DTensor.from_local`: it wraps `local` as it is (no view, no
    autograd node, no check across ranks) under the very spec that was saved."""
    if spec is None:
        return local
    return _dtensor_class()(local, spec, requires_grad=False)


def _groups(meshes: Iterable[Any]) -> list:
    """One process group per dimension (of more than one rank) of each mesh."""
    return [mesh.get_group(d) for mesh in meshes for d in range(mesh.ndim) if mesh.size(d) > 1]


def smallest_over(meshes: Iterable[Any], value: int) -> int:
    """The smallest `value` of the ranks of `meshes` (a collective: every rank must call it)."""
    import torch.distributed as dist

    for group in _groups(meshes):
        values: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(values, value, group=group)
        value = min(values)
    return value


def first_rank_value(meshes: Iterable[Any], value: Any) -> Any:
    """The `value` of the first rank of `meshes` (its coordinate 0 in every dimension), on
    every rank (a collective: every rank must call it)."""
    import torch.distributed as dist

    for group in _groups(meshes):
        box = [value]
        dist.broadcast_object_list(box, group=group, group_src=0)
        value = box[0]
    return value
