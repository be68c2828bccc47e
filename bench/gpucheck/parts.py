"""The parts of the GPU check, in run order, each with its time cap.

Every part is a module with the same four names:
  TITLE                            one line for tables and the console
  plan(cfg) -> dict                its set-up, built without a device (what --dry-run records)
  run(cfg, cap_s) -> Finding       the measurement
  markdown(figures) -> str         its section of gpucheck.md, from the figures run() returned

`isolated` parts run in a worker subprocess (bench/gpucheck/worker.py) killed at the cap; the
cuda-tests part starts its own subprocess (pytest) under the same cap, so it runs in the parent.
The caps sum to less than the default budget (config.DEFAULT_BUDGET_S): worst case, every part
runs into its cap and the check still ends inside the budget.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Part:
    """One part: its name on the command line, its module, its cap in seconds."""

    name: str
    module: str  # importable module exposing TITLE, plan, run, markdown
    cap_s: int
    isolated: bool = True  # run in a worker subprocess killed at the cap

    def load(self) -> ModuleType:
        """The part's module (imported on first use)."""
        return importlib.import_module(self.module)


PARTS: tuple[Part, ...] = (
    Part("smoke", "bench.gpucheck.smoke", 30),
    Part("cuda-tests", "bench.gpucheck.cudatests", 150, isolated=False),
    Part("link", "bench.gpucheck.link", 30),
    Part("race", "bench.gpucheck.race", 60),
    Part("suite", "bench.gpucheck.suite", 150),
    Part("pcie", "bench.gpucheck.pcie", 40),
)
BY_NAME: dict[str, Part] = {p.name: p for p in PARTS}
