"""`--steps N`: the same seeded training run (AdamW) under plain and under each policy of ours.

Every run starts from the same weights, sees the same batches (seeded by step) and the same dropout
masks (RNG seeded before every forward). On the CPU the runtime is bitwise exact, so every loss of
every step must equal plain's exactly; the check reports the largest absolute difference.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .contenders import Contender, Plain
from .measure import STEP_SEED
from .presets import Preset
from .progress import Progress
from .results import LossCurve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveConfig:
    """A seeded AdamW run of `steps` steps at learning rate `lr`."""

    preset: Preset
    device: torch.device
    steps: int
    lr: float = 1e-3
    progress: bool = True


def train_losses(contender: Contender, base: nn.Module, cfg: CurveConfig, bar: Progress | None = None) -> list[float]:
    """Losses of `cfg.steps` AdamW steps of `contender` on a copy of `base`."""
    att = contender.attach(copy.deepcopy(base), cfg.preset.blocks)
    opt = torch.optim.AdamW(att.params, lr=cfg.lr)
    losses = []
    for s in range(cfg.steps):
        batch = cfg.preset.batch_for(cfg.device, seed=s)
        torch.manual_seed(STEP_SEED + s)
        loss = att.loss(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if bar is not None:
            bar.advance(contender.name)
    att.close()
    return losses


def run_loss_curves(cfg: CurveConfig, contenders: Sequence[Contender]) -> list[LossCurve]:
    """Plain's curve first, then each contender's, with its largest |loss - plain loss|."""
    base = cfg.preset.build(cfg.device)
    runs = [Plain()] + [c for c in contenders if c.name != "plain"]
    curves = []
    with Progress(len(runs) * cfg.steps, "loss curves", enabled=cfg.progress) as bar:
        ref = train_losses(runs[0], base, cfg, bar)
        curves.append(LossCurve("plain", ref, 0.0))
        for c in runs[1:]:
            losses = train_losses(c, base, cfg, bar)
            diff = max((abs(a - b) for a, b in zip(ref, losses)), default=0.0)
            curves.append(LossCurve(c.name, losses, diff))
    return curves
