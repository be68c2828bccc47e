"""Selective recompute: inside a recomputed region, save the outputs of expensive ops (matmuls,
attention) and replay only the cheap ones, as PyTorch's `CheckpointPolicy` functions say.

The user's policy function has PyTorch's signature, `fn(ctx, op, *args, **kwargs) ->
CheckpointPolicy` (or a bool: True = save). During the region's forward a dispatch mode asks it
about every op: MUST_SAVE / PREFER_SAVE keep the op's outputs on the device; MUST_CPU_OFFLOAD /
PREFER_CPU_OFFLOAD offload them through our host pool (PyTorch honours these only under
torch.compile; we do in eager mode); the RECOMPUTE policies store nothing. During the replay a
second dispatch mode hands the stored outputs back instead of running those ops again.

Autograd sits above both modes, so the region still saves the same tensors in the same order and
the replay still matches them by position (Rule 7). A stored output that was modified in place
after it was stored is not trusted: that op runs again in the replay instead. Random ops are
never stored: skipping one in the replay would skip its RNG draw and shift every later one.

Rule 1 for stored outputs: the replay gets a fresh alias of each, never the stored tensor itself.
Autograd sets the replay's history on what an op returns; were that the stored tensor, it would
hold the replay's graph, whose hooks hold the frame that holds the store: a cycle through C++
that gc cannot see, leaking every stored output of every step.
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

OpPolicy = Callable[..., Any]

_IGNORED = {torch.ops.aten.detach.default, torch.ops.aten.alias.default,
            torch.ops.aten.lift_fresh.default}
_SAVE = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
_OFFLOAD = tuple(p for p in (getattr(CheckpointPolicy, "MUST_CPU_OFFLOAD", None),
                             getattr(CheckpointPolicy, "PREFER_CPU_OFFLOAD", None)) if p is not None)
try:  # torch >= 2.13 passes the op's output to the policy
    SelectiveCheckpointContext(is_recompute=False, op_output=None)
    _CTX_OUTPUT = True
except TypeError:
    _CTX_OUTPUT = False


def _context(out) -> SelectiveCheckpointContext:
    if _CTX_OUTPUT:
        return SelectiveCheckpointContext(is_recompute=False, op_output=out)
    return SelectiveCheckpointContext(is_recompute=False)


@functools.lru_cache(maxsize=None)
def _stored_ok(func) -> bool:
    """Ops whose outputs may be stored: not views (free to redo) and not random (a stored random
    op would skip its RNG draw in the replay and shift every later draw)."""
    return (func not in _IGNORED and not any(r.alias_info is not None for r in func._schema.returns)
            and torch.Tag.nondeterministic_seeded not in func.tags)


def _versioned_views():
    """Below autograd, detach() would not share the version counter; with the ADInplaceOrView
    key back on it does, so an in-place op on a stored output is seen (as PyTorch's own
    selective checkpointing does)."""
    guard = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
    if guard is None:
        return contextlib.nullcontext()
    return guard(torch._C.DispatchKey.ADInplaceOrView, False)


class _Kept:
    """A stored output kept on the device, with the version it had when stored."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor):
        self.tensor = t
        self.version = t._version

    def get(self) -> torch.Tensor | None:
        if self.tensor._version != self.version:
            return None
        with _versioned_views():  # Rule 1 above: a fresh alias, never the stored tensor
            return self.tensor.detach()


class _Moved:
    """A stored output offloaded through the pool (an OffloadHandle)."""

    __slots__ = ("handle",)

    def __init__(self, handle):
        self.handle = handle

    def get(self) -> torch.Tensor | None:
        if not self.handle.copy.unchanged(self.handle.ref(), self.handle.version):
            return None
        return self.handle.unpack()


class OpStore:
    """The outputs one recomputed region call stored, keyed by (op, n-th call of that op)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, int], Any] = {}


class SaveOps(TorchDispatchMode):
    """Forward of a recomputed region: run every op, store the outputs the policy saves."""

    def __init__(self, policy: OpPolicy, store: OpStore, offload: Callable[[torch.Tensor], Any],
                 keep: Callable[[torch.Tensor], None]):
        super().__init__()
        self.policy, self.store, self.offload, self.keep = policy, store, offload, keep
        self.calls: dict[Any, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _stored_ok(func):
            return out
        n = self.calls[func]
        self.calls[func] += 1
        decision = self.policy(_context(out), func, *args, **kwargs)
        if isinstance(decision, bool):
            decision = CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
        if decision in _SAVE:
            self.store.entries[(func, n)] = tree_map(self._kept, out)
        elif decision in _OFFLOAD:
            self.store.entries[(func, n)] = tree_map(self._moved, out)
        return out

    def _kept(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        self.keep(x)
        with _versioned_views():
            return _Kept(x.detach())

    def _moved(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        with _versioned_views():  # the host copy's alias must see in-place ops too
            handle = self.offload(x)
        return _Moved(handle) if handle is not None else self._kept(x)


class ReplayOps(TorchDispatchMode):
    """Replay of a recomputed region: stored outputs come back instead of running their ops."""

    def __init__(self, store: OpStore):
        super().__init__()
        self.store = store
        self.calls: dict[Any, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _stored_ok(func):
            return func(*args, **kwargs)
        n = self.calls[func]
        self.calls[func] += 1
        entry = self.store.entries.get((func, n))
        if entry is not None:
            values = tree_map(lambda e: e.get() if isinstance(e, (_Kept, _Moved)) else e, entry)
            if all(v is not None for v in torch.utils._pytree.tree_leaves(values)):
                return values
        return func(*args, **kwargs)
