"""Replaying a region's forward in backward to refill the tensors it dropped.

Rule 7 (recompute replays the forward exactly): the replay runs under the RNG state (CPU and
device), autocast state and default device recorded when the region ran, with grad enabled, and
its inputs as the forward had them: each one that needs grad attached to the graph before the
region, as torch.utils.checkpoint's are (a backward inside the replayed forward may reach past the
region), whether its data was kept or offloaded; one that needs no grad as the very object. Its
saved tensors are matched to the dropped ones by order; shape or dtype that differ, or a different
count, raise OffloadError. It stops as soon as the last still-needed tensor exists. Inputs that
were offloaded are unpacked through their handles, so the replay waits for their reloads.

A backward may run inside a region's forward (`torch.autograd.grad` in a block, a gradient
penalty, `grad(checkpoint(grad(f)))`), so inside its replay too: every tensor the replay saves can
be unpacked while the replay runs (detached when it needs grad, as torch.utils.checkpoint's
recompute saves it) and dies with the replay's graph. While the region's own forward runs, its
slots give back the forward's own tensors (the frame holds them until the forward ends): an inner
backward there reads what plain PyTorch reads, and replays nothing. One that reaches an earlier
region replays that region inside this forward; `ReplayGuard` knows which replays run on a thread,
so neither a selective forward nor an outer replay takes the inner replay's ops for its own.

The replay calls the module the way the forward did (`module(*args, **kwargs)`), so the user's
forward pre-hooks and hooks run again and a module compiled in place (`module.compile()`) runs its
compiled code; the runtime's own region hooks do not open new regions meanwhile (ReplayGuard).
What the region reads from its module, and the state its forward modifies, are `StateReads`
(state.py): checked before the replay, and snapshotted and restored around it.

Rule 5 for recomputed tensors: each slot records the version of the tensor it stands for. Until
the region's forward ends the frame holds those tensors, so an in-place change inside the region
is seen even if the tensor dies there; afterwards the slot watches the tensor while it lives.

A region whose forward modifies its tensor inputs in place (its first op `ReLU(inplace=True)`)
would replay from modified inputs: the first call of each region module (per training mode)
clones its inputs and keeps the clones if they were needed; such a region's later calls keep
clones of their inputs, and each replay runs on a copy of them. A region that does something
its earlier calls did not (modifies its inputs or state where nothing was snapshotted) cannot be
replayed: that call keeps what its forward saved instead, and the runtime says so.

Our own replay rather than torch.utils.checkpoint: the region's inputs must themselves be
offloadable, and every saved tensor must pass through one hook.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import OffloadError
from .handles import SlotHandle
from ..observe.ranges import op_range
from .selective import ReplayOps
from .state import Habits, StateReads

log = logging.getLogger(__name__)


class _StopReplay(Exception):
    """Raised from the replay's pack hook once every needed tensor is refilled."""


class ReplayGuard(threading.local):
    """Per thread, the replays running, innermost last. While any runs, region hooks open no new
    regions and a selective forward stores nothing; a replay that runs another one (a backward
    inside the replayed forward reaching an earlier region) lets that one's ops through."""

    def __init__(self) -> None:
        self.frames: list = []

    @property
    def depth(self) -> int:
        return len(self.frames)

    def innermost(self):
        """The frame whose replay runs innermost on this thread, or None."""
        return self.frames[-1] if self.frames else None

    @contextlib.contextmanager
    def active(self, frame=None):
        self.frames.append(frame)
        try:
            yield
        finally:
            self.frames.pop()


def plain_call(args: tuple, kwargs: dict) -> bool:
    """The common call, positional tensors only: its leaves are `args` themselves, no pytree."""
    return not kwargs and all(type(a) is torch.Tensor for a in args)


def is_kv_cache(x) -> bool:
    """A Hugging Face `Cache` (DynamicCache and friends), recognised without importing transformers."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(x).__mro__)


def _device_module(device: torch.device):
    if device.type == "cpu":
        return None
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "get_rng_state") or not mod.is_initialized():
        return None
    return mod


class RecomputeFrame:
    """All state of one recomputed region call: inputs, RNG/autocast state, module state, slots."""

    def __init__(self, name: str, module: nn.Module, args: tuple, kwargs: dict, device: torch.device,
                 pack_input: Callable[[torch.Tensor], Any], guard: ReplayGuard,
                 on_replay: Callable[[str, object, object, list], None], mark: Callable[[], object],
                 habits: Habits):
        self.name = name
        self.module = module
        self.device = device
        self.guard = guard
        self.on_replay = on_replay
        self.mark = mark
        self.habits = habits
        self.reads = StateReads(module, habits)  # before the user's pre-hooks run (ours runs first)
        flat, self.spec = (list(args), None) if plain_call(args, kwargs) else tree_flatten((args, kwargs))
        # Inputs the forward may modify in place are cloned (see the module docstring).
        self.copy_inputs = habits.inputs is True
        self._pack_input = pack_input
        self._live: list[tuple[int, torch.Tensor, int]] = []  # (position, input, version) until forward ends
        self._clones: dict[int, torch.Tensor] = {}  # position -> clone, while not known to be needed
        self.inputs = []
        for i, x in enumerate(flat):
            if not isinstance(x, torch.Tensor):
                # A KV cache (Hugging Face) is replayed as None: the replay must not append to it
                # again, and in training there is no past, so attention sees the same keys either way.
                self.inputs.append(None if is_kv_cache(x) else x)
                continue
            self._live.append((i, x, x._version))
            if habits.inputs is not False:
                with torch.no_grad():
                    clone = x.detach().clone()
                if self.copy_inputs:
                    x = clone
                else:
                    self._clones[i] = clone
            self.inputs.append(_Input(pack_input(x), flat[i]))
        self.cpu_rng = torch.get_rng_state()
        mod = _device_module(device)
        self.device_rng = mod.get_rng_state(device) if mod is not None else None
        self.autocast = [(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
                         for dt in dict.fromkeys(("cpu", device.type))]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.default_device = torch.get_default_device()
        # per saved tensor, in pack order: shape (None: nested), dtype, and the op that made it
        self.meta: list[tuple[tuple[int, ...] | None, torch.dtype, str | None]] = []
        self.slots: list[weakref.ref | None] = []  # None where the tensor was kept (parameters)
        self._held: list[tuple[SlotHandle, torch.Tensor]] = []  # the slots' tensors, until forward ends
        self.in_forward = True  # the region's forward runs: its slots give back the forward's tensors
        self.store = None  # an OpStore when selective recompute saved some op outputs
        self._lock = threading.Lock()
        self._cursor = 0
        self._stop_at = -1

    # -- forward ----------------------------------------------------------------------------------
    def add_kept(self, t: torch.Tensor) -> None:
        self.meta.append((_shape(t), t.dtype, _producer(t)))
        self.slots.append(None)

    def add_slot(self, t: torch.Tensor) -> SlotHandle:
        slot = SlotHandle(self, len(self.meta), t)
        self.meta.append((_shape(t), t.dtype, _producer(t)))
        self.slots.append(weakref.ref(slot))
        self._held.append((slot, t))
        return slot

    def end_forward(self) -> bool:
        """The region's forward returned: learn its habits, settle what the replay will read.
        False when it cannot be replayed: its slots then keep the forward's tensors."""
        modified = [i for i, x, version in self._live if x._version != version]
        surprises = self.reads.end_forward()
        if self.habits.inputs is None:
            self.habits.inputs = bool(modified)
            self.copy_inputs = bool(modified)
            for i in modified:
                self.inputs[i].box.handle = self._pack_input(self._clones[i])
        elif modified and not self.copy_inputs:
            self.habits.inputs = True
            surprises.append("its inputs")
        for slot, t in self._held:  # Rule 5: an in-place change after the save, inside the region
            if t._version != slot.version:
                slot.changed = t._version
        replayable = not surprises
        if not replayable:
            log.warning("HybridCheckpointer: region %s modified %s in place during this forward, which "
                        "its earlier calls did not; this call cannot be recomputed, so it keeps the "
                        "tensors its forward saved. Later calls snapshot them and recompute.",
                        self.name, ", ".join(surprises))
            for slot, t in self._held:
                slot.pin(t.detach() if t.requires_grad else t)  # one that needs no grad as itself (handles.py)
            self.inputs = []
        self.in_forward = False
        self._held.clear()
        self._live.clear()
        self._clones.clear()
        return replayable

    def abandon(self) -> None:
        """The forward failed inside the region: let go of what only the forward needed."""
        self.in_forward = False
        self._held.clear()
        self._live.clear()
        self._clones.clear()

    # -- backward ---------------------------------------------------------------------------------
    def replay(self) -> None:
        """Run the region's forward again and fill every live, empty slot (thread-safe)."""
        with self._lock:
            needed = [i for i, ref in enumerate(self.slots)
                      if ref is not None and (s := ref()) is not None and s.current() is None]
            if not needed:
                return
            self.reads.check(self.name)
            self._stop_at = needed[-1]
            self._cursor = 0
            start = self.mark()
            args, kwargs = self._replay_inputs()
            # The profiler range outside the replay's dispatch modes: its ops are not the region's.
            with op_range(f"offload::recompute {self.name}", self.device.type == "cuda"), self._replay_context():
                try:
                    self.module(*args, **kwargs)  # as the user called it: hooks, compiled code
                except _StopReplay:
                    pass
                else:
                    shape, dtype, made_by = self.meta[self._cursor]  # _pack raised past the last one
                    raise OffloadError(
                        f"offload: recompute of region {self.name} saved {self._cursor} tensors for "
                        f"backward, but its forward saved {len(self.meta)}; the first one the replay did "
                        f"not save is #{self._cursor}, a {tuple(shape)} {dtype} tensor {_made_by(made_by)}. "
                        f"{_LIKELY_CAUSES}")
            refilled = [slot.value for i in needed if (slot := self.slots[i]()) is not None and slot.value is not None]
            self.on_replay(self.name, start, self.mark(), refilled)

    def _replay_inputs(self) -> tuple[tuple, dict]:
        flat = []
        for entry in self.inputs:
            if not isinstance(entry, _Input):
                flat.append(entry)
                continue
            x = entry.get()
            if self.copy_inputs:  # the forward modifies its inputs: the replay must not modify ours
                with torch.enable_grad():
                    x = x.clone()
            flat.append(x)
        return (tuple(flat), {}) if self.spec is None else tree_unflatten(flat, self.spec)

    @contextlib.contextmanager
    def _replay_context(self):
        mod = _device_module(self.device)
        cpu_rng = torch.get_rng_state()
        dev_rng = mod.get_rng_state(self.device) if mod is not None and self.device_rng is not None else None
        try:
            torch.set_rng_state(self.cpu_rng)
            if dev_rng is not None:
                mod.set_rng_state(self.device_rng, self.device)
            with contextlib.ExitStack() as stack:
                stack.enter_context(self.reads.replayed())
                for dt, enabled, dtype in self.autocast:
                    if (torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt),
                            torch.is_autocast_cache_enabled()) != (enabled, dtype, self.autocast_cache):
                        stack.enter_context(torch.autocast(dt, dtype=dtype, enabled=enabled,
                                                           cache_enabled=self.autocast_cache))
                if torch.get_default_device() != self.default_device:
                    stack.enter_context(self.default_device)
                stack.enter_context(torch.enable_grad())
                stack.enter_context(self.guard.active(self))
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack_replayed))
                if self.store is not None:
                    stack.enter_context(ReplayOps(self.store, mine=lambda: self.guard.innermost() in (None, self)))
                yield
        finally:
            torch.set_rng_state(cpu_rng)
            if dev_rng is not None:
                mod.set_rng_state(dev_rng, self.device)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        i = self._cursor
        self._cursor += 1
        if i >= len(self.meta):
            raise OffloadError(
                f"offload: recompute of region {self.name} saved more tensors for backward than its "
                f"forward ({len(self.meta)}); the first extra one is a {tuple(t.shape)} {t.dtype} tensor "
                f"{_made_by(_producer(t))}. {_LIKELY_CAUSES}")
        shape, dtype, made_by = self.meta[i]
        if _shape(t) != shape or t.dtype != dtype:
            raise OffloadError(
                f"offload: recompute of region {self.name} differs from its forward at saved tensor #{i}: "
                f"the forward saved a {tuple(shape)} {dtype} tensor {_made_by(made_by)}, the replay a "
                f"{tuple(t.shape)} {t.dtype} tensor {_made_by(_producer(t))}. {_LIKELY_CAUSES}")
        # What a backward inside the replay unpacks (see the module docstring): detached when it
        # needs grad (no cycle through its own node), else the very object (identity, handles.py).
        held = t.detach() if t.requires_grad else t
        ref = self.slots[i]
        slot = ref() if ref is not None else None
        if slot is not None and slot.current() is None:
            slot.value = held
        if i >= self._stop_at:
            raise _StopReplay
        return held


def _shape(t: torch.Tensor) -> tuple[int, ...] | None:
    """What a replayed tensor's shape is matched by; None for a nested tensor (a strided one has
    no sizes, a jagged one a new nested int each time it is built: kept, it is only counted)."""
    return None if t.is_nested else tuple(t.shape)


_LIKELY_CAUSES = (
    "Recompute runs the region's forward again and needs it to do the same work. Likely causes: a "
    "forward hook or pre-hook that behaves differently when called again; a module compiled with "
    "torch.compile whose graph differs between the forward and the replay (compile the blocks, "
    "not the whole model); control flow that depends on tensor values, on global state or on "
    "module attributes changed since the forward; random numbers drawn outside torch (Python's "
    "random, NumPy). Make the forward do the same work when called again, or keep this region "
    "out of recompute (a policy callable returning Action.KEEP or Action.OFFLOAD for it).")


def _producer(t: torch.Tensor) -> str | None:
    fn = t.grad_fn
    return fn.name() if fn is not None else None


def _made_by(name: str | None) -> str:
    if name is None:
        return "with no autograd history (a parameter, an input or a constant)"
    op = re.sub(r"(?<!^)(?=[A-Z])", "_", re.sub(r"Backward\d*$", "", name)).lower()
    return f"made by {op} ({name})"


def _unpack_replayed(t: torch.Tensor) -> torch.Tensor:
    """A backward inside the replayed forward reads what the replay saved."""
    return t


class _Box:
    """What an input's SavedTensor packs: the input's handle, which the region's first call may
    swap for its clone's when the forward turns out to modify its inputs (end_forward)."""

    __slots__ = ("handle",)

    def __init__(self, handle):
        self.handle = handle


_make_saved_tensor = getattr(torch._C._autograd, "_make_saved_tensor", None)


class _Input:
    """One tensor input of a recomputed region call, as its replay gets it.

    The handle (`box.handle`: kept, offloaded or a clone's) holds the data and checks Rule 5 at
    unpack. An input that needs grad also gets a SavedTensor, as torch.utils.checkpoint saves its
    inputs: autograd's own saved variable, whose data goes through our handle and which holds the
    input's place in the graph before the region (its grad_fn, or a leaf's grad accumulator), not
    its storage. The replay's input is then attached there, so a backward inside the replay may
    reach past the region (a gradient penalty with respect to the model input), and an offloaded
    input still frees its device memory meanwhile. The place is taken when the region call starts,
    so an input the forward then modifies in place does not tie the frame to its own nodes."""

    __slots__ = ("box", "requires_grad", "saved")

    def __init__(self, handle, x: torch.Tensor):
        self.box = _Box(handle)
        self.requires_grad = x.requires_grad
        self.saved = _attached(x, self.box) if x.requires_grad else None

    def get(self) -> torch.Tensor:
        if self.saved is not None:
            return self.saved.unpack()  # unpacks box.handle, attached to the graph before the region
        t = self.box.handle.unpack()
        return t.detach().requires_grad_(True) if self.requires_grad else t  # one that needs no grad: itself


def _attached(x: torch.Tensor, box: _Box):
    """A SavedTensor of `x` whose data is `box`'s handle (None where this PyTorch has no
    `_make_saved_tensor`, or cannot save `x` so: the replay then gets it detached)."""
    if _make_saved_tensor is None:
        return None
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda _t: box, _unpack_box):
            return _make_saved_tensor(x, is_output=False)
    except (RuntimeError, TypeError):
        return None


def _unpack_box(box: _Box) -> torch.Tensor:
    return box.handle.unpack()
