"""`--soak N`: N training steps under each policy of ours; nothing may grow with them (Rule 9).

Per policy: N seeded training steps (forward under `with hc:`, backward, AdamW), each followed by
an evaluation forward under `with hc:` with grad on (a graph that dies unused) and one under
`torch.no_grad()`; then an evaluation phase of N more such forward pairs without any backward
(an evaluation loop inside `with hc:`). Figures are taken after step `early` (past the warm-up
and policy="auto"'s profiling) and at the very end, each with every copy finished and after a
full garbage collection:

  pool bytes  host pool bytes in use (a leaked host copy stays counted)
  tensors     torch tensors the garbage collector tracks (leaked activations, copy buffers)
  objects     Python objects the garbage collector tracks (handles, events, futures)
  blocks      memory blocks the interpreter has allocated (`sys.getallocatedblocks()`): also
              what the collector does not track, such as the strings and tuples of a log
  RSS         the process's resident bytes (psutil; the allocators keep freed pages: noisy)

Growth is end - early: a leak of k blocks per loop pass (a training step or an evaluation pair)
shows as about (2 N - early) k.
"""
from __future__ import annotations

import copy
import gc
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from offload import HybridCheckpointer
from offload.observe.hostmem import process_rss_bytes

from .contenders import Contender
from .measure import STEP_SEED, synchronize
from .presets import Preset
from .progress import Progress
from .results import SoakFigures, SoakResult

EARLY_STEPS = 10  # steps before the first figures (auto plans after its third)


@dataclass(frozen=True)
class SoakConfig:
    """`steps` training steps (each with its two evaluation forwards), then as many evaluation
    pairs alone, per contender."""

    preset: Preset
    device: torch.device
    steps: int
    lr: float = 1e-3
    progress: bool = True

    @property
    def early(self) -> int:
        """The step after which the first figures are taken (0-based)."""
        return min(EARLY_STEPS, self.steps // 2)


def figures(hc: HybridCheckpointer, device: torch.device) -> SoakFigures:
    """What the process holds now, after every copy finished and a full collection."""
    hc.backend.settle()
    synchronize(device)
    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for o in objects if issubclass(type(o), torch.Tensor))
    count = len(objects)
    del objects
    return SoakFigures(pool_bytes=hc.host_pool.in_use, tensors=tensors, objects=count,
                       blocks=sys.getallocatedblocks(), rss_bytes=process_rss_bytes())


def soak(contender: Contender, base: torch.nn.Module, cfg: SoakConfig, bar: Progress | None = None) -> SoakResult:
    """Run `cfg.steps` steps of `contender` on a copy of `base`, then its evaluation phase; its
    figures after step `early`, halfway from there and at the end."""
    att = contender.attach(copy.deepcopy(base), cfg.preset.blocks)
    hc = att.runtime
    opt = torch.optim.AdamW(att.params, lr=cfg.lr)
    early = mid = None
    halfway = (cfg.early + 2 * cfg.steps - 1) // 2
    for s in range(2 * cfg.steps):
        batch = cfg.preset.batch_for(cfg.device, seed=s % cfg.steps)
        if s < cfg.steps:
            torch.manual_seed(STEP_SEED + s)
            att.loss(*batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with hc:  # evaluation with grad on: a graph that dies unused
            att.model(*batch)
        with hc, torch.no_grad():
            att.model(*batch)
        if s == cfg.early:
            early = figures(hc, cfg.device)
        elif s == halfway:
            mid = figures(hc, cfg.device)
        if bar is not None:
            bar.advance(contender.name)
    end = figures(hc, cfg.device)
    att.close()
    return SoakResult(contender.name, cfg.steps, cfg.early, early, end, mid)


def run_soak(cfg: SoakConfig, contenders: Sequence[Contender]) -> list[SoakResult]:
    """One soak per contender (each on its own copy of one seeded model)."""
    base = cfg.preset.build(cfg.device)
    with Progress(len(contenders) * 2 * cfg.steps, "soak", enabled=cfg.progress) as bar:
        return [soak(c, base, cfg, bar) for c in contenders]
