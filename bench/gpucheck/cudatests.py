"""The cuda-tests part: `pytest -m cuda` in a subprocess under the part's cap, with a per-test
timeout, read back from its junit XML (or, if pytest was killed before writing it, from the
`-v` lines it had printed)."""
from __future__ import annotations

import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import CheckConfig
from .outcome import Finding
from .runner import REPO, run_process, tail

TITLE = "CUDA-marked tests (pytest -m cuda)"
_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*)$")


@dataclass
class PytestCounts:
    """Outcome counts of a pytest run and the names behind the bad ones."""

    passed: int = 0
    failed: int = 0  # failures and errors
    skipped: int = 0
    failing: list[str] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)  # reason -> tests

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        reason = reason.strip() or "no reason given"
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1


def junit_path(cfg: CheckConfig) -> Path:
    return cfg.logs / "cuda-tests.xml"


def timeout_plugin() -> bool:
    """Whether pytest-timeout is installed (it gives the per-test timeout)."""
    return importlib.util.find_spec("pytest_timeout") is not None


def pytest_command(cfg: CheckConfig) -> list[str]:
    """`python -m pytest -m cuda` over the repo's tests, junit XML under logs/."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rA", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit2", f"--junitxml={junit_path(cfg)}"]
    if timeout_plugin():
        cmd.append(f"--timeout={cfg.test_timeout_s}")
    return cmd + [str(REPO / "tests")]


def plan(cfg: CheckConfig) -> dict:
    return dict(command=pytest_command(cfg), per_test_timeout_s=cfg.test_timeout_s if timeout_plugin() else None,
                note=None if timeout_plugin() else "pytest-timeout is not installed: only the part's cap applies")


def parse_junit(path: Path) -> PytestCounts:
    """Counts from a junit XML file (xunit1 or xunit2)."""
    counts = PytestCounts()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts.failed += 1
            message = (bad.get("message") or "").strip().splitlines()
            counts.failing.append(f"{name}: {message[0][:200]}" if message else name)
        elif skip is not None:
            counts._skip(skip.get("message") or "")
        else:
            counts.passed += 1
    return counts


def parse_verbose(text: str) -> PytestCounts:
    """Counts from the `-v` lines pytest printed (`path::test PASSED  [ 5%]`)."""
    counts = PytestCounts()
    for line in text.splitlines():
        m = _VERBOSE.match(line.strip())
        if not m:
            continue
        name, outcome, rest = m.groups()
        if outcome in ("PASSED", "XPASS"):
            counts.passed += 1
        elif outcome in ("FAILED", "ERROR"):
            counts.failed += 1
            counts.failing.append(name)
        else:
            counts._skip(re.sub(r"\s*\[\s*\d+%\]\s*$", "", rest).strip(" ()"))
    return counts


def run(cfg: CheckConfig, cap_s: float) -> Finding:
    log_path = cfg.logs / "cuda-tests.log"
    junit = junit_path(cfg)
    junit.unlink(missing_ok=True)
    outcome = run_process(pytest_command(cfg), log_path, cap_s)
    counts = parse_junit(junit) if junit.exists() else parse_verbose(log_path.read_text(errors="replace"))
    figures = dict(asdict(counts), returncode=outcome.returncode, seconds=outcome.seconds,
                   source="junit" if junit.exists() else "pytest -v output", command=pytest_command(cfg))
    problems = [f"failed: {name}" for name in counts.failing]
    if outcome.timed_out:
        problems.append(f"pytest ran past the part's cap of {cap_s:.0f} s and was killed "
                        f"({counts.total} tests had finished)")
    elif outcome.returncode == 5:
        problems.append("no test is marked cuda (pytest collected none)")
    elif outcome.returncode not in (0, 1):
        problems.append(f"pytest stopped with exit status {outcome.returncode}: {tail(log_path, 3)}")
    if cfg.on_cuda and counts.total and counts.passed == 0:
        problems.append(f"no CUDA test passed ({counts.skipped} skipped): {counts.skip_reasons}")
    summary = f"{counts.passed} passed, {counts.failed} failed, {counts.skipped} skipped in {outcome.seconds:.0f} s"
    return Finding(summary, figures, problems)


def markdown(figures: dict) -> str:
    lines = [f"passed {figures.get('passed')}, failed {figures.get('failed')}, skipped {figures.get('skipped')} "
             f"(from {figures.get('source')}, exit status {figures.get('returncode')})"]
    lines += [f"- FAILED {name}" for name in figures.get("failing", [])]
    lines += [f"- skipped ({n}): {reason}" for reason, n in figures.get("skip_reasons", {}).items()]
    return "\n".join(lines)
