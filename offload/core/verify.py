"""Verify mode: compare what comes back in backward with what forward saved.

With `HybridCheckpointer(..., verify=True)` every tensor the runtime offloads or drops for
recompute keeps a reference taken at pack time: a host copy of its values while the step's
references fit in `Verify.reference_bytes`, a checksum (float64 sum and sum of absolute values)
beyond that. At unpack the reloaded or recomputed tensor is compared with it, and the result is
counted per segment in the step's `VerifyLog` (`hc.report().verify`). Reloads must match bitwise;
recomputed tensors within `atol` (0: bitwise, right on the CPU; GPU kernels may round differently
in a replay). `verify="strict"` raises `OffloadError` at the first mismatch.

The op that produced each saved tensor is read off the dispatcher during forward (`OpNames`), so a
mismatch names it: "aten::mul.Tensor", not only "saved tensor #12".

Cost: one synchronous device-to-host copy per offloaded or recomputed tensor at pack time and
another at unpack, and up to `reference_bytes` of host memory per step. A debugging mode.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import OffloadError

DEFAULT_REFERENCE_BYTES = 1 << 30


@dataclass(frozen=True)
class Verify:
    """How verify mode compares (`HybridCheckpointer(verify=Verify(...))`; True and "strict" are
    shorthands for `Verify()` and `Verify(strict=True)`)."""

    strict: bool = False  # raise OffloadError at the first mismatch
    atol: float = 0.0  # absolute tolerance for recomputed tensors (reloads are always bitwise)
    reference_bytes: int = DEFAULT_REFERENCE_BYTES  # host bytes of reference copies per step; checksums beyond

    def __post_init__(self) -> None:
        if not (isinstance(self.atol, (int, float)) and self.atol >= 0):
            raise ValueError(f"offload.Verify(atol={self.atol!r}): expected a number >= 0")
        if isinstance(self.reference_bytes, bool) or not isinstance(self.reference_bytes, int) \
                or self.reference_bytes < 0:
            raise ValueError(f"offload.Verify(reference_bytes={self.reference_bytes!r}): expected an int >= 0")


def resolve_verify(verify: Any) -> Verify | None:
    """The user's `verify=` argument as a `Verify` (None: off)."""
    if verify is None or verify is False:
        return None
    if verify is True:
        return Verify()
    if verify == "strict":
        return Verify(strict=True)
    if isinstance(verify, Verify):
        return verify
    raise ValueError(f"HybridCheckpointer(verify={verify!r}): expected False, True, 'strict' or an offload.Verify")


class OpNames(TorchDispatchMode):
    """Active during a verified forward: which op produced each storage (weakly keyed)."""

    def __init__(self):
        super().__init__()
        self.names: dict[StorageWeakRef, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name + (f".{func._overloadname}" if func._overloadname != "default" else "")
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.names.setdefault(StorageWeakRef(t.untyped_storage()), name)
        return out

    def name_of(self, t: torch.Tensor) -> str:
        try:
            return self.names.get(StorageWeakRef(t.untyped_storage()), "an input of the forward")
        except RuntimeError:  # a tensor without storage
            return "an op without storage"


@dataclass
class SegmentVerify:
    """One segment's comparisons."""

    name: str
    compared: int = 0
    mismatches: int = 0
    max_abs_diff: float = 0.0


@dataclass
class VerifyLog:
    """The comparisons of one step; unpack hooks run on autograd's threads (Rule 8): locked."""

    mode: str = "on"
    reference_bytes: int = 0  # host bytes held by reference copies this step
    checksummed: int = 0  # tensors compared by checksum only (past reference_bytes)
    segments: dict[str, SegmentVerify] = field(default_factory=dict)
    first_mismatch: dict | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, segment: str, diff: float, mismatch: dict | None) -> None:
        with self._lock:
            seg = self.segments.setdefault(segment, SegmentVerify(segment))
            seg.compared += 1
            seg.max_abs_diff = max(seg.max_abs_diff, diff)
            if mismatch is not None:
                seg.mismatches += 1
                if self.first_mismatch is None:
                    self.first_mismatch = mismatch

    def to_dict(self) -> dict:
        with self._lock:
            segs = [dict(name=s.name, compared=s.compared, mismatches=s.mismatches, max_abs_diff=s.max_abs_diff)
                    for s in self.segments.values()]
        return dict(mode=self.mode, compared=sum(s["compared"] for s in segs),
                    mismatches=sum(s["mismatches"] for s in segs),
                    max_abs_diff=max((s["max_abs_diff"] for s in segs), default=0.0),
                    reference_bytes=self.reference_bytes, checksummed=self.checksummed,
                    segments=segs, first_mismatch=self.first_mismatch)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    x = t.detach()
    x = torch.view_as_real(x) if x.is_complex() else x
    x = x.to(torch.float64)
    return torch.stack([x.sum(), x.abs().sum()]).cpu()


def _difference(expected: torch.Tensor, got: torch.Tensor) -> tuple[bool, float]:
    """(bitwise equal, max absolute difference); NaNs in the same places count as equal."""
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return False, float("inf")
    same = (expected == got)
    if expected.is_floating_point() or expected.is_complex():
        same |= expected.isnan() & got.isnan()
    if bool(same.all()):
        return True, 0.0
    a = torch.view_as_real(expected) if expected.is_complex() else expected
    b = torch.view_as_real(got) if got.is_complex() else got
    diff = (a.to(torch.float64) - b.to(torch.float64)).abs().nan_to_num(nan=float("inf"))
    return False, float(diff.max()) if diff.numel() else 0.0


class Verifier:
    """Takes references at pack and compares at unpack, for one step's `VerifyLog`."""

    def __init__(self, config: Verify, names: OpNames | None):
        self.config = config
        self.names = names

    def wrap(self, handle, t: torch.Tensor, log: VerifyLog, segment: str, index: int,
             action: str) -> "VerifiedHandle":
        """`handle` (an offload or recompute handle of `t`) with a reference taken now, its
        comparison counted in `log` (the step's)."""
        nbytes = t.numel() * t.element_size()
        with log._lock:
            full = log.reference_bytes + nbytes <= self.config.reference_bytes
            if full:
                log.reference_bytes += nbytes
            else:
                log.checksummed += 1
        reference = t.detach().to("cpu", copy=True) if full else _checksum(t)
        op = self.names.name_of(t) if self.names is not None else "unknown"
        return VerifiedHandle(handle, self, log, reference, full, dict(
            segment=segment, index=index, action=action, op=op, shape=tuple(t.shape), dtype=str(t.dtype)))

    def check(self, log: VerifyLog, site: dict, reference: torch.Tensor, full: bool, got: torch.Tensor) -> None:
        atol = self.config.atol if site["action"] == "recomputed" else 0.0
        if full:
            equal, diff = _difference(reference, got.detach().cpu())
        else:
            now = _checksum(got)
            equal, diff = bool(torch.equal(now, reference)), float((now - reference).abs().max())
        ok = equal or diff <= atol
        mismatch = None if ok else dict(site, max_abs_diff=diff, compared_by="values" if full else "checksum")
        log.add(site["segment"], diff, mismatch)
        if mismatch is not None and self.config.strict:
            raise OffloadError(
                f"offload verify: the {site['action']} tensor #{site['index']} of {site['segment']} "
                f"(shape {site['shape']}, {site['dtype']}, produced by {site['op']}) came back different "
                f"(max abs diff {diff:.3g}{f', tolerance {atol:g}' if atol else ''}). For a recomputed "
                f"tensor the region's replay differs from its forward: look for state the forward reads "
                f"and changes (counters, Python random numbers, data-dependent control flow, hooks). "
                f"For a reloaded one this is a bug in offload.")


class VerifiedHandle:
    """An offload or recompute handle plus the reference its unpack is compared with."""

    __slots__ = ("inner", "verifier", "log", "reference", "full", "site")

    def __init__(self, inner, verifier: Verifier, log: VerifyLog, reference: torch.Tensor, full: bool, site: dict):
        self.inner = inner
        self.verifier = verifier
        self.log = log
        self.reference = reference
        self.full = full
        self.site = site

    def unpack(self) -> torch.Tensor:
        out = self.inner.unpack()
        self.verifier.check(self.log, self.site, self.reference, self.full, out)
        return out
