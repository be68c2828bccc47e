"""What one `python -m bench.gpucheck` run is asked to do; the parent hands it to each worker as JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BUDGET_S = 480  # 8 minutes on one H200; the parts' caps sum to less (bench/gpucheck/parts.py)
DEFAULT_BUDGETS = (0.7, 0.5, 0.3)  # policy="auto" device budgets, fractions of keep's peak (as the bench)


@dataclass(frozen=True)
class CheckConfig:
    """Settings shared by every part. Times in seconds."""

    out: Path  # results folder: gpucheck.json, gpucheck.md, logs/
    device: str = "cuda"  # "cpu" rehearses the device-independent parts (smoke step, suite) on the CPU
    preset: str = "gpu-small"  # the bench preset the suite part runs
    warmup: int = 1  # suite: untimed rounds
    repeats: int = 3  # suite: timed rounds
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    test_timeout_s: int = 60  # cuda-tests: per-test timeout (pytest-timeout, when installed)
    dry_run: bool = False

    @property
    def logs(self) -> Path:
        """Where the parts' logs, the worker results and the pytest junit file go."""
        return self.out / "logs"

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "CheckConfig":
        d = json.loads(text)
        return cls(**dict(d, out=Path(d["out"]), budgets=tuple(d["budgets"])))
