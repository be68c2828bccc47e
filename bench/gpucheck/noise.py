"""The noise floor of gradient comparisons on a GPU: how far two plain runs of the same seeded
step differ. GPU kernels (flash attention's backward, split-K matmuls) are not run-to-run
deterministic, so on a GPU every contender, torch's own checkpointing too, differs from plain a
little; a contender is judged against this floor, not against zero.
"""
from __future__ import annotations

import copy
import gc
import itertools
from dataclasses import dataclass

import torch

from ..contenders import Plain
from ..measure import check_pass, compare_grads
from ..presets import Preset

PLAIN_RUNS = 3  # plain runs measured; the floor is the largest difference between any two
NOISE_FACTOR = 4.0  # a contender within this many floors of plain is "within noise"

BITWISE, WITHIN, ABOVE = "bitwise", "within noise", "above noise"


@dataclass(frozen=True)
class NoiseFloor:
    """Plain against plain: the largest absolute gradient difference between any two of `runs`."""

    runs: int
    max_abs_diff: float
    bitwise: bool  # every plain run gave the same gradients to the bit


def measure_floor(preset: Preset, device: torch.device, runs: int = PLAIN_RUNS) -> NoiseFloor:
    """Run plain `runs` times on copies of one seeded model and batch, as the suite runs it
    (bench.measure.check_pass: one warm-up step, then the measured one)."""
    base = preset.build(device)
    batch = preset.batch_for(device)
    grads = []
    for _ in range(runs):
        att = Plain().attach(copy.deepcopy(base), preset.blocks)
        grads.append(check_pass(att, batch, device).grads)
        del att
        gc.collect()
    pairs = [compare_grads(a, b) for a, b in itertools.combinations(grads, 2)]
    return NoiseFloor(runs, max(d for _, d in pairs), all(m for m, _ in pairs))


def verdict(bitwise: bool, diff: float, floor: NoiseFloor, factor: float = NOISE_FACTOR) -> str:
    """BITWISE, WITHIN (diff <= factor x the floor) or ABOVE (a real difference, or any
    difference where plain itself was bitwise repeatable)."""
    if bitwise:
        return BITWISE
    return WITHIN if diff <= factor * floor.max_abs_diff else ABOVE


def times_floor(diff: float, floor: NoiseFloor) -> float | None:
    """`diff` in units of the floor (None when the floor is zero)."""
    return diff / floor.max_abs_diff if floor.max_abs_diff > 0 else None
