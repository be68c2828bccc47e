"""What a part found (`Finding`, written by the part) and how it ended (`PartResult`, by the runner)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..results import _finite as finite  # JSON has no inf/nan: the bench's own conversion

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
DRY_RUN = "skipped: dry run"


@dataclass
class Finding:
    """A part's measurements. `problems` make the part fail; `skipped` says why it could not
    measure at all (e.g. NVML unavailable), which is not a failure."""

    summary: str  # one line for the console and the table
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(finite(dataclasses.asdict(self)), indent=1, default=str) + "\n")

    @classmethod
    def read(cls, path: Path) -> "Finding":
        return cls(**json.loads(path.read_text()))


@dataclass
class PartResult:
    """One part as the run ended it. `seconds` is its wall time, `cap_s` the limit it ran under."""

    name: str
    title: str
    status: str  # PASSED, FAILED or SKIPPED
    summary: str
    seconds: float = 0.0
    cap_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    log: str | None = None  # the part's log file, relative to the results folder
    log_tail: str = ""  # the log's last lines, kept when the part failed

    @classmethod
    def from_finding(cls, name: str, title: str, finding: Finding, seconds: float, cap_s: float,
                     log: str | None = None) -> "PartResult":
        status = SKIPPED if finding.skipped else FAILED if finding.problems else PASSED
        return cls(name, title, status, finding.summary, seconds, cap_s, list(finding.problems),
                   finding.figures, log)

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def to_dict(self) -> dict:
        return finite(dataclasses.asdict(self))
