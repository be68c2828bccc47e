"""Replaying a region's forward in backward to refill the tensors it dropped.

Rule 7 (recompute replays the forward exactly): the replay runs under the RNG state (CPU and
device), autocast state and default device recorded when the region ran, with grad enabled, and
its inputs detached with their original `requires_grad`. Its saved tensors are matched to the
dropped ones by order; shape or dtype that differ, or a different count, raise OffloadError. It
stops as soon as the last still-needed tensor exists. Inputs that were offloaded are unpacked
through their handles, so the replay waits for their reloads.

Our own replay rather than torch.utils.checkpoint: the region's inputs must themselves be
offloadable, and every saved tensor must pass through one hook.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import OffloadError
from .handles import SlotHandle
from ..observe.ranges import op_range
from .selective import ReplayOps


class _StopReplay(Exception):
    """Raised from the replay's pack hook once every needed tensor is refilled."""


class ReplayGuard(threading.local):
    """Per-thread flag: a replay is running, so region hooks must not open new regions."""

    depth = 0

    @contextlib.contextmanager
    def active(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


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
    """All state of one recomputed region call: inputs, RNG/autocast state, and its slots."""

    def __init__(self, name: str, forward: Callable, args: tuple, kwargs: dict, device: torch.device,
                 pack_input: Callable[[torch.Tensor], Any], guard: ReplayGuard,
                 on_replay: Callable[[str, object, object, list], None], mark: Callable[[], object]):
        self.name = name
        self.forward = forward
        self.device = device
        self.guard = guard
        self.on_replay = on_replay
        self.mark = mark
        flat, self.spec = tree_flatten((args, kwargs))
        # A KV cache (Hugging Face) is replayed as None: the replay must not append to it again,
        # and in training there is no past, so attention sees the same keys either way.
        self.inputs = [(pack_input(x), x.requires_grad) if isinstance(x, torch.Tensor)
                       else (None, None if is_kv_cache(x) else x) for x in flat]
        self.cpu_rng = torch.get_rng_state()
        mod = _device_module(device)
        self.device_rng = mod.get_rng_state(device) if mod is not None else None
        self.autocast = [(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
                         for dt in dict.fromkeys(("cpu", device.type))]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.default_device = torch.get_default_device()
        self.meta: list[tuple[tuple[int, ...] | None, torch.dtype]] = []  # per saved tensor, in pack order
        self.slots: list[weakref.ref | None] = []  # None where the tensor was kept (parameters)
        self.store = None  # an OpStore when selective recompute saved some op outputs
        self._lock = threading.Lock()
        self._cursor = 0
        self._stop_at = -1

    # -- forward ----------------------------------------------------------------------------------
    def add_kept(self, t: torch.Tensor) -> None:
        self.meta.append((_shape(t), t.dtype))
        self.slots.append(None)

    def add_slot(self, t: torch.Tensor) -> SlotHandle:
        slot = SlotHandle(self, len(self.meta))
        self.meta.append((_shape(t), t.dtype))
        self.slots.append(weakref.ref(slot))
        return slot

    # -- backward ---------------------------------------------------------------------------------
    def replay(self) -> None:
        """Run the region's forward again and fill every live, empty slot (thread-safe)."""
        with self._lock:
            needed = [i for i, ref in enumerate(self.slots)
                      if ref is not None and (s := ref()) is not None and s.current() is None]
            if not needed:
                return
            self._stop_at = needed[-1]
            self._cursor = 0
            start = self.mark()
            args, kwargs = self._replay_inputs()
            with self._replay_context(), op_range(f"offload::recompute {self.name}", self.device.type == "cuda"):
                try:
                    self.forward(*args, **kwargs)
                except _StopReplay:
                    pass
                else:
                    raise OffloadError(
                        f"offload: recompute of region {self.name} saved {self._cursor} tensors for "
                        f"backward, but its forward saved {len(self.meta)}. The region's forward must "
                        f"do the same work when replayed: avoid branching on global state or on values "
                        f"that change between forward and backward.")
            refilled = [slot.value for i in needed if (slot := self.slots[i]()) is not None and slot.value is not None]
            self.on_replay(self.name, start, self.mark(), refilled)

    def _replay_inputs(self) -> tuple[tuple, dict]:
        flat = []
        for handle, extra in self.inputs:
            if handle is None:
                flat.append(extra)
            else:
                flat.append(handle.unpack().detach().requires_grad_(extra))
        return tree_unflatten(flat, self.spec)

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
                for dt, enabled, dtype in self.autocast:
                    stack.enter_context(torch.autocast(dt, dtype=dtype, enabled=enabled,
                                                       cache_enabled=self.autocast_cache))
                if torch.get_default_device() != self.default_device:
                    stack.enter_context(self.default_device)
                stack.enter_context(torch.enable_grad())
                stack.enter_context(self.guard.active())
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _never_unpacked))
                if self.store is not None:
                    stack.enter_context(ReplayOps(self.store))
                yield
        finally:
            torch.set_rng_state(cpu_rng)
            if dev_rng is not None:
                mod.set_rng_state(dev_rng, self.device)

    def _pack(self, t: torch.Tensor) -> None:
        i = self._cursor
        self._cursor += 1
        if i >= len(self.meta):
            raise OffloadError(f"offload: recompute of region {self.name} saved more tensors than its forward "
                               f"({len(self.meta)}); the replay must do the same work as the forward")
        shape, dtype = self.meta[i]
        if _shape(t) != shape or t.dtype != dtype:
            raise OffloadError(
                f"offload: recompute of region {self.name} saved tensor #{i} with shape {_shape(t)} "
                f"and dtype {t.dtype}, but the forward saved shape {shape} and dtype {dtype}. "
                f"The region's forward must be deterministic in what it computes.")
        ref = self.slots[i]
        slot = ref() if ref is not None else None
        if slot is not None and slot.current() is None:
            slot.value = t.detach()
        if i >= self._stop_at:
            raise _StopReplay
        return None


def _shape(t: torch.Tensor) -> tuple[int, ...] | None:
    """What a replayed tensor's shape is matched by; None for a nested tensor (a strided one has
    no sizes, a jagged one a new nested int each time it is built: kept, it is only counted)."""
    return None if t.is_nested else tuple(t.shape)


def _never_unpacked(_):
    raise OffloadError("offload: a tensor saved during a recompute replay was unpacked; this is a bug in offload")
