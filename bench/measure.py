"""Measuring one training step: its time, its peak device memory, its gradients.

A step is forward + backward (no optimizer step), on one fixed batch, with the RNG seeded before
the forward so dropout draws the same masks for every contender. Time and memory are measured in
separate passes: the memory pass runs under the torch profiler on the CPU, which slows the step.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from offload import PeakMemory

from .contenders import Attached
from .progress import Progress

Batch = tuple[torch.Tensor, torch.Tensor]
STEP_SEED = 1234  # torch.manual_seed before every measured forward (dropout masks)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(att: Attached, batch: Batch, seed: int = STEP_SEED) -> torch.Tensor:
    """One forward + backward from cleared gradients; returns the detached loss."""
    att.zero_grad()
    torch.manual_seed(seed)
    loss = att.loss(*batch)
    loss.backward()
    return loss.detach()


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside: its pauses would land on whichever step is timed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed_step(att: Attached, batch: Batch, device: torch.device) -> float:
    """Seconds of one `step` (device work included), with the cyclic collector paused; the young
    generations are collected before, untimed (a full collection costs ~0.1 s with torch loaded)."""
    att.zero_grad()
    gc.collect(1)
    with gc_paused():
        synchronize(device)
        t0 = time.perf_counter()
        step(att, batch)
        synchronize(device)
        seconds = time.perf_counter() - t0
    att.zero_grad()  # free the gradients while the other contenders run
    return seconds


@dataclass
class Check:
    """The memory-and-gradients pass of one contender."""

    peak_bytes: int  # peak device bytes above the level at the step's start (grads included)
    loss: float
    grads: list[torch.Tensor | None]
    report: dict = field(default_factory=dict)


def peak_pass(att: Attached, batch: Batch, device: torch.device, warmup: int = 1) -> tuple[int, torch.Tensor]:
    """`warmup` untimed steps, then one step under `offload.PeakMemory`: (peak bytes, loss).
    The gradients of the measured step are left in `att.params`."""
    for _ in range(warmup):
        step(att, batch)
    att.zero_grad()
    gc.collect()
    with PeakMemory(device) as pm:
        loss = step(att, batch)
    return pm.peak_bytes, loss


def check_pass(att: Attached, batch: Batch, device: torch.device, warmup: int = 1) -> Check:
    """`warmup` untimed steps, then one step under `offload.PeakMemory` whose gradients are kept."""
    peak, loss = peak_pass(att, batch, device, warmup)
    grads = [None if p.grad is None else p.grad.detach().clone() for p in att.params]
    att.zero_grad()
    return Check(peak, float(loss), grads, att.report())


def compare_grads(ref: Sequence[torch.Tensor | None], got: Sequence[torch.Tensor | None]) -> tuple[bool, float]:
    """(bitwise equal everywhere, largest absolute difference) between two gradient lists."""
    if len(ref) != len(got):
        return False, float("inf")
    equal, worst = True, 0.0
    for a, b in zip(ref, got):
        if a is None or b is None:
            equal = equal and a is None and b is None
            continue
        if a.shape != b.shape:
            return False, float("inf")
        equal = equal and torch.equal(a, b)
        worst = max(worst, (a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
    return equal, worst


@dataclass
class Timing:
    """Step times of one contender, warm-up excluded, plus the runtime's stall per step."""

    seconds: list[float] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def ratio_to(self, other: "Timing") -> float:
        """Median over rounds of this step time / `other`'s in the same round: paired, so noise
        that slows a whole round cancels out."""
        return statistics.median(a / b for a, b in zip(self.seconds, other.seconds))


def time_interleaved(attached: dict[str, Attached], batch: Batch, device: torch.device,
                     warmup: int, repeats: int, progress: bool = True) -> dict[str, Timing]:
    """Round-robin over the contenders, `warmup` rounds then `repeats` timed rounds, so that
    machine noise falls on all of them alike; each round starts one contender further on, so none
    always runs right after the same other. `seconds[i]` of every contender is from round i."""
    out = {name: Timing() for name in attached}
    names = list(attached)
    rounds = warmup + repeats
    with Progress(rounds * len(attached), "timing", enabled=progress) as bar:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                att = attached[name]
                dt = timed_step(att, batch, device)
                if r >= warmup:
                    out[name].seconds.append(dt)
                    if att.runtime is not None:
                        out[name].stall_s.append(float(att.report().get("stall_s", 0.0) or 0.0))
                bar.advance(name)
    return out
