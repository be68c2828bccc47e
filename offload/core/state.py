"""The module state a recomputed region reads: its parameters, buffers and tensor attributes.

Rule 5 for recompute: the replay reads the module's state again in backward, so that state must
be what the forward read. `StateReads` records each tensor's version when the region call starts,
and the replay raises if one changed since (a parameter updated in place, a buffer reset, a
tensor attribute edited between forward and backward). Where a module's state lives is found on
its first call per training mode; what is assigned there later is read from there, but a tensor
attribute that did not exist then is not watched.

Rule 7 for state the forward itself modifies (BatchNorm's running statistics and batch count,
spectral norm's power-iteration vectors, a step counter): the replay must read what the forward
read, and leave what one plain forward leaves. What a region's forward modifies is learned per
module and training mode (`Habits`): the first call snapshots every buffer and compares when it
ends, by value too (BatchNorm's kernel updates its statistics without bumping their version);
later calls snapshot only what was seen modified. During the replay those tensors hold their
snapshot; afterwards, the values and versions they had before it.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import OffloadError


@dataclass
class Habits:
    """What one region module's forward was seen to modify in place, in one training mode, and
    where its state lives."""

    inputs: bool | None = None  # its tensor inputs; None: not seen yet
    state: frozenset[str] | None = None  # names of its state tensors; None: not seen yet
    places: list | None = None  # state_places(module), found on the first call


class HabitBook:
    """Habits per region module (weakly held) and training mode; as many as the model has regions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_module: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def of(self, module: nn.Module) -> Habits:
        with self._lock:
            return self._by_module.setdefault(module, {}).setdefault(module.training, Habits())


def state_places(module: nn.Module) -> list[tuple[str, dict, str, bool]]:
    """(name under `module`, the dict that holds it, its key there, is a buffer) for every
    parameter, buffer and tensor attribute of `module` and its submodules, each tensor once.
    The dicts are the modules' own, so a tensor assigned again later is found there."""
    seen: set[int] = set()
    out = []
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        attrs = vars(mod)
        for is_buffer, where in ((False, mod._parameters), (True, mod._buffers), (False, attrs)):
            for name, t in where.items():
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    out.append((dot + name, where, name, is_buffer))
    return out


class StateReads:
    """One region call's view of its module state: versions when it started, and snapshots of
    what its forward modifies."""

    def __init__(self, module: nn.Module, habits: Habits):
        self.habits = habits
        if habits.places is None:
            habits.places = state_places(module)
        self.tensors = [(name, t, is_buffer) for name, where, key, is_buffer in habits.places
                        if isinstance(t := where.get(key), torch.Tensor)]
        self.versions = [t._version for _, t, _ in self.tensors]
        self._learning = habits.state is None
        known = habits.state or frozenset()
        with torch.no_grad():
            self.snapshots: dict[int, torch.Tensor] = {
                i: t.detach().clone() for i, (name, t, is_buffer) in enumerate(self.tensors)
                if (is_buffer if self._learning else name in known)}

    def end_forward(self) -> list[str]:
        """The forward ended: learn what it modified; the names it modified with no snapshot
        (the replay could not read what it read)."""
        changed = {i for i, (_, t, _) in enumerate(self.tensors) if t._version != self.versions[i]}
        if self._learning:
            changed |= {i for i, snap in self.snapshots.items() if not _same(self.tensors[i][1], snap)}
            self.snapshots = {i: snap for i, snap in self.snapshots.items() if i in changed}
        unsnapped = sorted(changed - self.snapshots.keys())
        names = frozenset(self.tensors[i][0] for i in changed)
        self.habits.state = names if self._learning else self.habits.state | names
        return [self.tensors[i][0] for i in unsnapped]

    def check(self, region: str) -> None:
        """Rule 5: raise if state the replay reads was modified in place since the forward read it."""
        for i, (name, t, _) in enumerate(self.tensors):
            if i not in self.snapshots and t._version != self.versions[i]:
                raise OffloadError(
                    f"offload: {region}.{name} (shape {tuple(t.shape)}, {t.dtype}) was modified in place "
                    f"between the forward of region {region} and its recompute in backward (version "
                    f"{self.versions[i]} then, {t._version} now). The replay would read the new values and "
                    f"the gradients would not be those of the forward. Modify module state only after "
                    f"backward (optimizer.step() after loss.backward()), or keep this region out of "
                    f"recompute (a policy callable returning Action.KEEP or Action.OFFLOAD for it).")

    @contextlib.contextmanager
    def replayed(self):
        """Rule 7: snapshotted tensors hold what the forward read while the replay runs, then the
        values and versions they held before it (what the forward, or the user since, left)."""
        if not self.snapshots:
            yield
            return
        tensors = [self.tensors[i][1] for i in self.snapshots]
        versions = [t._version for t in tensors]
        with torch.no_grad():
            now = [t.detach().clone() for t in tensors]
            for t, snap in zip(tensors, self.snapshots.values()):
                t.copy_(snap)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, value in zip(tensors, now):
                    t.copy_(value)
            torch._C._autograd._unsafe_set_version_counter(tensors, versions)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values; sparse ones compared dense; what cannot be compared counts as changed."""
    try:
        if a.shape != b.shape or a.dtype != b.dtype or a.layout != b.layout:
            return False
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        return bool(torch.equal(a, b))
    except (RuntimeError, NotImplementedError):  # nested and other tensors without plain values
        return False
