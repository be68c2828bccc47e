"""What the bench found, as plain dataclasses that serialise to the JSON file."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ContenderResult:
    """One contender's figures in the main bench. Times in seconds, memory in bytes."""

    name: str
    family: str  # "baseline" (torch), "ours" (fixed policy), "auto" (policy="auto" sweep)
    step_s: float  # median forward+backward time (no optimizer step), warm-up excluded
    step_s_all: list[float]
    step_s_min: float  # fastest timed step: less sensitive to other jobs on the machine
    ratio_to_plain: float  # median over timed rounds of (step time / plain's in the same round)
    tokens_per_s: float
    peak_bytes: int  # peak device memory of one step above its starting level (offload.PeakMemory)
    loss: float
    grads_match: bool  # every parameter gradient bitwise equal to plain's, same seeded batch
    grads_max_abs_diff: float
    device_budget: int | None = None  # auto contenders: the budget they were given
    offloaded_bytes: int | None = None  # from hc.report(); None for contenders without our runtime
    recomputed_bytes: int | None = None
    overlap_fraction: float | None = None
    stall_s: float | None = None  # median per timed step
    report: dict = field(default_factory=dict)  # hc.report().to_dict() of the checked step


@dataclass
class Skipped:
    """A contender that did not run, and why."""

    name: str
    reason: str


@dataclass
class FitResult:
    """The largest size (batch or sequence) a contender trains under the cap."""

    name: str
    size: int  # 0: not even size 1 fits
    peak_bytes: int | None  # measured at `size`
    tokens_per_s: float | None  # at `size`
    probes: list[tuple[int, int | None]] = field(default_factory=list)  # (size, peak bytes; None = OOM)
    capped: bool = False  # the search stopped at the upper bound, not at the cap


@dataclass
class LossCurve:
    """Losses of a seeded AdamW run under one contender, and its distance to plain's."""

    name: str
    losses: list[float]
    max_abs_diff: float  # largest |loss - plain loss| over the run


@dataclass
class SoakFigures:
    """What a process holds at one point of a soak (bytes and counts)."""

    pool_bytes: int  # host pool bytes in use
    tensors: int  # torch tensors the garbage collector tracks
    objects: int  # Python objects the garbage collector tracks
    blocks: int  # memory blocks the interpreter has allocated (sys.getallocatedblocks)
    rss_bytes: int  # resident memory of the process


@dataclass
class SoakResult:
    """One contender's soak: its figures after step `early_step` and at the end (after its
    evaluation phase)."""

    name: str
    steps: int
    early_step: int
    early: SoakFigures
    end: SoakFigures
    mid: SoakFigures | None = None  # halfway from `early` to the end: a leak grows in both halves

    @property
    def growth(self) -> SoakFigures:
        """end - early, figure by figure."""
        return SoakFigures(**{k: getattr(self.end, k) - getattr(self.early, k) for k in vars(self.end)})


@dataclass
class BudgetUseRow:
    """One contender of the budget-use table (bytes, seconds)."""

    name: str
    device_budget: int | None  # auto contenders only
    saved_peak_bytes: int | None  # measured by the runtime on the last timed step; None for plain
    planned_peak_bytes: int | None  # the plan's simulated peak, working sets included (auto only)
    step_s: float  # median timed step
    ratio_to_plain: float  # median over rounds of step / plain's step in the same round

    @property
    def use(self) -> float | None:
        """Measured saved peak over the budget."""
        if self.device_budget is None or self.saved_peak_bytes is None:
            return None
        return self.saved_peak_bytes / self.device_budget


@dataclass
class BenchResult:
    """Everything one `python -m bench` run measured."""

    meta: dict
    contenders: dict[str, ContenderResult] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    max_fit: dict | None = None  # {"cap_bytes", "dim", "results": [FitResult]}
    loss_curve: dict | None = None  # {"steps", "curves": [LossCurve]}
    soak: dict | None = None  # {"steps", "early_step", "results": [SoakResult]}
    budget_use: dict | None = None  # {"keep_saved_peak_bytes", "fractions", "rows": [BudgetUseRow]}

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


def _finite(obj):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
