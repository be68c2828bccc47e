"""Selective recompute: inside a recomputed region, save the outputs of expensive ops (matmuls,
attention) and replay only the cheap ones, as PyTorch's `CheckpointPolicy` functions say.

The user's policy takes PyTorch's forms, parsed once (`resolve_op_policy`): a function
`fn(ctx, op, *args, **kwargs) -> CheckpointPolicy` (or a bool: True = save), or a list of ops to
save, as `create_selective_checkpoint_contexts` takes them. During the region's forward a dispatch
mode asks it about every op PyTorch asks about (all but `SAC_IGNORED_OPS`: views, in-place and
random ops too), in the same order, so a stateful policy decides as it would under
torch.utils.checkpoint: MUST_SAVE / PREFER_SAVE keep the op's outputs on the device;
MUST_CPU_OFFLOAD / PREFER_CPU_OFFLOAD offload them through our host pool (PyTorch honours these
only under torch.compile; we do in eager mode); the RECOMPUTE policies store nothing. During the
replay a second dispatch mode hands the stored outputs back instead of running those ops again.
It asks the policy again (`ctx.is_recompute=True`, about the same ops) where the installed
PyTorch does so during its recompute, and only there: earlier releases did, 2.13 asks during
forward only (`is_recompute` is deprecated there and always False). Which one is installed is
probed once, through the public API, when a checkpointer is built with a policy.

A backward inside a region's forward may replay another region meanwhile (`torch.autograd.grad`
through an earlier block): the forward's mode stores nothing while a replay runs on its thread,
and a replay's mode lets through the ops of a replay nested inside it, so neither takes another
region's ops for its own.

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
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

log = logging.getLogger(__name__)

# Ops PyTorch never asks a policy about (its own checkpointing adds or drops them).
_NOT_ASKED = frozenset(getattr(torch_checkpoint, "SAC_IGNORED_OPS", {torch.ops.aten.detach.default}))
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


def _context(out, is_recompute: bool = False) -> SelectiveCheckpointContext:
    if _CTX_OUTPUT:
        return SelectiveCheckpointContext(is_recompute=is_recompute, op_output=out)
    return SelectiveCheckpointContext(is_recompute=is_recompute)


def _decide(fn: Callable[..., Any], ctx: SelectiveCheckpointContext, func, args, kwargs) -> CheckpointPolicy:
    decision = fn(ctx, func, *args, **kwargs)
    if isinstance(decision, bool):
        return CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
    return decision


@dataclass(frozen=True)
class OpPolicy:
    """The user's `op_policy=`, parsed once: a policy function, and whether the replay asks it
    again (as the installed PyTorch's selective checkpointing does during recompute, or not)."""

    fn: Callable[..., Any]
    on_replay: bool


@functools.lru_cache(maxsize=None)
def torch_consults_on_recompute() -> bool:
    """Whether this PyTorch asks a selective-checkpoint policy again during recompute (earlier
    releases, with `ctx.is_recompute=True`) or during forward only (2.13). Probed once, on a
    one-element CPU tensor, through the public API; if the probe cannot run here, False."""
    asked: list[bool] = []

    def probe(ctx, op, *args, **kwargs):
        asked.append(ctx.is_recompute)
        return CheckpointPolicy.PREFER_RECOMPUTE

    contexts = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, probe)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.ones(1, device="cpu", requires_grad=True)
            out = torch_checkpoint.checkpoint(torch.sin, x, use_reentrant=False, context_fn=contexts)
            torch.autograd.grad(out, x)
    except Exception as e:  # e.g. built under another library's saved-tensor hooks
        log.debug("could not probe whether PyTorch consults selective-checkpoint policies during "
                  "recompute (%s); assuming it does not", e)
        return False
    return any(asked)


def _op_name(op) -> str:
    return f"torch.ops.{op._qualified_op_name.replace('::', '.')}"


def resolve_op_policy(op_policy) -> OpPolicy | None:
    """The user's `op_policy=`: None, a PyTorch policy function, or a list of ops to save (each an
    OpOverload such as torch.ops.aten.mm.default), as `create_selective_checkpoint_contexts`
    takes them. Parsed at the public boundary; bad values raise where PyTorch raises."""
    if op_policy is None:
        return None
    if isinstance(op_policy, list):
        for i, op in enumerate(op_policy):
            if isinstance(op, torch._ops.OpOverloadPacket):
                raise ValueError(f"HybridCheckpointer(op_policy={op_policy!r}): item {i} ({_op_name(op)}) is an "
                                 f"op overload packet; list one overload of it, e.g. {_op_name(op)}.default")
            if not isinstance(op, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
                raise ValueError(f"HybridCheckpointer(op_policy={op_policy!r}): item {i} ({op!r}, a "
                                 f"{type(op).__name__}) is not an op overload; list ops such as "
                                 f"torch.ops.aten.mm.default")
        ops = frozenset(op_policy)

        def save_listed(ctx, op, *args, **kwargs):
            return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

        return OpPolicy(save_listed, torch_consults_on_recompute())
    if callable(op_policy):
        return OpPolicy(op_policy, torch_consults_on_recompute())
    raise TypeError(f"HybridCheckpointer(op_policy={op_policy!r}): expected a function (ctx, op, *args, "
                    f"**kwargs) -> torch.utils.checkpoint.CheckpointPolicy, or a list of ops to save "
                    f"(e.g. [torch.ops.aten.mm.default])")


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
    """The outputs one recomputed region call stored, keyed by (op, n-th call of that op), and
    the policy that chose them."""

    def __init__(self, policy: OpPolicy) -> None:
        self.policy = policy
        self.entries: dict[tuple[Any, int], Any] = {}


class SaveOps(TorchDispatchMode):
    """Forward of a recomputed region: run every op, ask the policy about it, store the outputs
    it saves. `replaying()` says whether a replay runs on this thread: a backward inside the
    region's forward may replay another region meanwhile, whose ops are not this forward's."""

    def __init__(self, store: OpStore, offload: Callable[[torch.Tensor], Any],
                 keep: Callable[[torch.Tensor], None], replaying: Callable[[], bool]):
        super().__init__()
        self.policy, self.store, self.offload, self.keep = store.policy.fn, store, offload, keep
        self.replaying = replaying
        self.calls: dict[Any, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _NOT_ASKED or self.replaying():
            return out
        decision = _decide(self.policy, _context(out), func, args, kwargs)
        if not _stored_ok(func):  # asked, as PyTorch asks, but views and random ops are redone
            return out
        n = self.calls[func]
        self.calls[func] += 1
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
    """Replay of a recomputed region: stored outputs come back instead of running their ops.
    Where PyTorch asks the policy again during recompute, so do we, about the same ops (the store
    decides either way). `mine()` says whether an op is this replay's: false while another replay
    runs inside it on this thread, whose ops pass through here."""

    def __init__(self, store: OpStore, mine: Callable[[], bool]):
        super().__init__()
        self.store, self.mine = store, mine
        self.policy = store.policy.fn if store.policy.on_replay else None
        self.calls: dict[Any, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.mine():
            return func(*args, **kwargs)
        if self.policy is not None and func not in _NOT_ASKED:
            _decide(self.policy, _context(None, is_recompute=True), func, args, kwargs)
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
