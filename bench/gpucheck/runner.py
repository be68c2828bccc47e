"""Running one part under its cap: in a worker subprocess killed at the cap, or (for a part that
starts its own subprocess) in this process.

A killed worker takes its whole process group with it (SIGTERM, then SIGKILL after a grace
period): a part hung in a CUDA call or a copy cannot eat the time of the parts after it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import CheckConfig
from .outcome import DRY_RUN, FAILED, SKIPPED, Finding, PartResult
from .parts import Part

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # the checkout holding bench/, offload/, tests/
GRACE_S = 5.0  # after SIGTERM, before SIGKILL
TAIL_LINES = 30


@dataclass(frozen=True)
class ProcessOutcome:
    """How a subprocess ended: its exit status (None when killed at the cap) and wall seconds."""

    returncode: int | None
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def repo_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (the repo is not pip-installed there)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))


def run_process(cmd: Sequence[str], log_path: Path, timeout_s: float) -> ProcessOutcome:
    """Run `cmd` in the checkout in a new session, stdout and stderr appended to `log_path`; kill
    its process group if it runs past `timeout_s`."""
    t0 = time.monotonic()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=repo_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return ProcessOutcome(rc, time.monotonic() - t0)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def worker_command(part: Part, cfg: CheckConfig, cap_s: float) -> list[str]:
    """The command line of the worker that runs `part` (its config and result files under logs/)."""
    return [sys.executable, "-m", "bench.gpucheck.worker", part.name, "--config", str(cfg.logs / "config.json"),
            "--result", str(cfg.logs / f"{part.name}.json"), "--cap", f"{cap_s:.0f}"]


def dry_run(part: Part, cfg: CheckConfig, cap_s: float) -> PartResult:
    """The part's set-up without a device: its plan (and worker command), a placeholder result."""
    module = part.load()
    figures = {"plan": module.plan(cfg)}
    if part.isolated:
        figures["command"] = worker_command(part, cfg, cap_s)
    return PartResult(part.name, module.TITLE, SKIPPED, DRY_RUN, 0.0, cap_s, figures=figures)


def run_part(part: Part, cfg: CheckConfig, cap_s: float) -> PartResult:
    """Run `part` under `cap_s` seconds; any crash or timeout becomes a failed result."""
    if cfg.dry_run:
        return dry_run(part, cfg, cap_s)
    module = part.load()
    log_path = cfg.logs / f"{part.name}.log"
    rel = str(log_path.relative_to(cfg.out))
    if not part.isolated:
        t0 = time.monotonic()
        try:
            finding = module.run(cfg, cap_s)
        except Exception as e:  # a bug in one part must not stop the others
            log.debug("part %s raised", part.name, exc_info=True)
            return PartResult(part.name, module.TITLE, FAILED, f"crashed: {type(e).__name__}: {e}",
                              time.monotonic() - t0, cap_s, [f"{part.name} crashed: {type(e).__name__}: {e}"],
                              log=rel, log_tail=traceback.format_exc())
        return PartResult.from_finding(part.name, module.TITLE, finding, time.monotonic() - t0, cap_s, rel)

    result_path = cfg.logs / f"{part.name}.json"
    result_path.unlink(missing_ok=True)
    outcome = run_process(worker_command(part, cfg, cap_s), log_path, cap_s)
    if outcome.timed_out:
        why = f"timed out after {cap_s:.0f} s (its cap); killed"
    elif outcome.returncode != 0 or not result_path.exists():
        last = tail(log_path, 1) or "no output"
        why = f"crashed (exit status {outcome.returncode}): {last}"
    else:
        return PartResult.from_finding(part.name, module.TITLE, Finding.read(result_path), outcome.seconds,
                                       cap_s, rel)
    return PartResult(part.name, module.TITLE, FAILED, why, outcome.seconds, cap_s, [f"{part.name} {why}"],
                      log=rel, log_tail=tail(log_path))
