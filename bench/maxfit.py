"""`--max-fit CAP`: the largest batch (or sequence) each contender trains under a device-memory cap.

"Fits" means the step's measured peak (offload.PeakMemory: device bytes above the level at the
step's start, so activations, gradients and temporaries, not parameters) stays within the cap, and
on CUDA that the step does not run out of memory. The search doubles the size from 1 until it no
longer fits, then bisects; it assumes the peak grows with the size. Throughput at the found size is
the median of `repeats` steps, timed contender after contender (not interleaved).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .contenders import Contender
from .measure import peak_pass, timed_step
from .presets import Preset
from .progress import Progress
from .results import FitResult, Skipped
from .suite import attach_auto, auto_contenders, runtime_settings

log = logging.getLogger(__name__)

DIMS = ("batch", "seq")


@dataclass(frozen=True)
class FitConfig:
    """How the max-fit search runs. `cap_bytes` and `upper` (the largest size tried) are ints."""

    preset: Preset
    device: torch.device
    cap_bytes: int
    dim: str  # "batch" or "seq"
    upper: int
    warmup: int
    repeats: int
    budgets: tuple[float, ...]  # auto contenders' device budgets, as fractions of the cap
    progress: bool = True

    def __post_init__(self):
        if self.dim not in DIMS:
            raise ValueError(f"--fit-dim={self.dim!r}: use one of {DIMS}")
        if self.upper < 1:
            raise ValueError(f"--fit-max={self.upper!r}: must be at least 1")


def largest_fitting(fits: Callable[[int], bool], upper: int) -> tuple[int, bool]:
    """The largest n in 1..upper with `fits(n)`, for `fits` true up to some n and false after:
    doubling from 1, then bisection. Returns (n, reached_upper); n is 0 when 1 does not fit."""
    if not fits(1):
        return 0, False
    lo, hi = 1, None
    while hi is None:
        nxt = min(2 * lo, upper)
        if nxt == lo:
            return lo, True
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sized(preset: Preset, dim: str, n: int) -> Preset:
    return preset.with_sizes(batch=n) if dim == "batch" else preset.with_sizes(seq=n)


def fit_one(contender: Contender, base: torch.nn.Module, cfg: FitConfig, bar: Progress) -> FitResult:
    """Search the largest size for one contender, then time it there."""
    probes: list[tuple[int, int | None]] = []
    warmup = min(cfg.warmup, 1) + contender.settle_steps

    def peak_at(n: int) -> int | None:
        sized = _sized(cfg.preset, cfg.dim, n)
        att = contender.attach(copy.deepcopy(base), cfg.preset.blocks)
        try:
            peak, _ = peak_pass(att, sized.batch_for(cfg.device), cfg.device, warmup=warmup)
        except torch.OutOfMemoryError:
            peak = None
        finally:
            att.close()
            del att
            _release(cfg.device)
        probes.append((n, peak))
        bar.describe(f"{contender.name} {cfg.dim}={n}")
        return peak

    size, capped = largest_fitting(lambda n: (p := peak_at(n)) is not None and p <= cfg.cap_bytes, cfg.upper)
    if size == 0:
        return FitResult(contender.name, 0, None, None, probes)
    sized = _sized(cfg.preset, cfg.dim, size)
    att = contender.attach(copy.deepcopy(base), cfg.preset.blocks)
    batch = sized.batch_for(cfg.device)
    times = [timed_step(att, batch, cfg.device) for _ in range(warmup + cfg.repeats)][warmup:]
    att.close()
    del att, batch
    _release(cfg.device)
    peak = dict(probes)[size]
    return FitResult(contender.name, size, peak, sized.tokens / statistics.median(times), probes, capped)


def run_maxfit(cfg: FitConfig, contenders: Sequence[Contender]) -> tuple[list[FitResult], list[Skipped]]:
    """The largest size under the cap for every contender, plus policy="auto" at fractions of the
    cap when it is available."""
    preset = cfg.preset.with_sizes(seq=cfg.upper) if cfg.dim == "seq" else cfg.preset
    base = preset.build(cfg.device)  # one set of weights for every size (positions up to `upper`)
    contenders = list(contenders)
    skipped: list[Skipped] = []
    for auto in auto_contenders(cfg.budgets, cfg.cap_bytes, runtime_settings(preset), of="cap"):
        probe = attach_auto(auto, copy.deepcopy(base), preset.blocks, _sized(preset, cfg.dim, 1).batch_for(cfg.device))
        if isinstance(probe, Skipped):
            skipped.append(probe)
        else:
            probe.close()
            contenders.append(auto)
    results = []
    with Progress(len(contenders), "max-fit", enabled=cfg.progress) as bar:
        for c in contenders:
            results.append(fit_one(c, base, dataclasses.replace(cfg, preset=preset), bar))
            bar.advance(c.name)
    return results, skipped

