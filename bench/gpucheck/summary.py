"""The two files a check leaves: `gpucheck.json` (everything) and `gpucheck.md` (for people)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..tables import format_table
from .outcome import FAILED, PartResult
from .parts import BY_NAME

log = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME = "gpucheck.json", "gpucheck.md"


def to_dict(meta: dict, results: Sequence[PartResult]) -> dict:
    failed = [r.name for r in results if r.status == FAILED]
    return dict(meta=meta, passed=not failed, failed=failed, parts=[r.to_dict() for r in results])


def parts_table(results: Sequence[PartResult]) -> str:
    """One line per part: status, seconds against its cap, summary."""
    return format_table(["part", "status", "seconds / cap", "summary"],
                        [[r.name, r.status, f"{r.seconds:.0f} / {r.cap_s:.0f}", r.summary] for r in results])


def _details(r: PartResult) -> str:
    if "plan" in r.figures:
        return "set-up:\n```json\n" + json.dumps(r.figures, indent=1, default=str) + "\n```"
    if not r.figures:
        return ""
    try:
        return BY_NAME[r.name].load().markdown(r.figures)
    except Exception:  # a figure missing after a partial run must not lose the rest of the summary
        log.warning("could not render the %s figures; writing them as JSON", r.name, exc_info=True)
        return "```json\n" + json.dumps(r.figures, indent=1, default=str) + "\n```"


def markdown(meta: dict, results: Sequence[PartResult]) -> str:
    failed = [r.name for r in results if r.status == FAILED]
    verdict = "all parts passed or were skipped" if not failed else f"FAILED: {', '.join(failed)}"
    out = [f"# GPU check: {verdict}", "",
           f"{meta.get('device_name') or meta.get('device')}, started {meta.get('started')}, "
           f"{meta.get('seconds', 0):.0f} s of a {meta.get('budget_s')} s budget"
           + (" (dry run)" if meta.get("dry_run") else ""), "",
           "```", parts_table(results), "```"]
    for r in results:
        out += ["", f"## {r.name}: {r.title}", "", f"**{r.status}** in {r.seconds:.1f} s (cap {r.cap_s:.0f} s): {r.summary}"]
        if r.problems:
            out += [""] + [f"- {p}" for p in r.problems]
        details = _details(r)
        if details:
            out += ["", details]
        if r.log:
            out += ["", f"log: `{r.log}`"]
        if r.status == FAILED and r.log_tail:
            out += ["", "```", r.log_tail, "```"]
    return "\n".join(out) + "\n"


def write(out: Path, meta: dict, results: Sequence[PartResult]) -> tuple[Path, Path]:
    """Write both files under `out`; returns their paths."""
    js, md = out / JSON_NAME, out / MARKDOWN_NAME
    js.write_text(json.dumps(to_dict(meta, results), indent=2, default=str) + "\n")
    md.write_text(markdown(meta, results))
    return js, md
