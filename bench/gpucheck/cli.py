"""`python -m bench.gpucheck --out DIR`: run the parts in order under one time budget, write
gpucheck.json and gpucheck.md, print what failed; exit status 1 if any part failed, 2 on bad usage.

    python -m bench.gpucheck --out $OUT/gpucheck             # everything, at most 8 minutes
    python -m bench.gpucheck --out /tmp/g --parts smoke,race  # some parts
    python -m bench.gpucheck --out /tmp/g --dry-run           # every part's set-up, no device
"""
from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..cli import _fractions, _int_at_least
from ..presets import PRESETS
from .config import DEFAULT_BUDGET_S, DEFAULT_BUDGETS, CheckConfig
from .outcome import FAILED, SKIPPED, PartResult
from .parts import BY_NAME, PARTS, Part
from .runner import REPO, run_part
from .summary import JSON_NAME, MARKDOWN_NAME, parts_table, write

MIN_CAP_S = 10  # a part is not started with less time than this left in the budget


def _parts(text: str) -> tuple[Part, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--parts={text!r}: choose from {', '.join(BY_NAME)}")
    return tuple(p for p in PARTS if p.name in names)  # always in run order


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.gpucheck`."""
    caps = ", ".join(f"{p.name} {p.cap_s} s" for p in PARTS)
    p = argparse.ArgumentParser(
        prog="python -m bench.gpucheck",
        description="One bounded pass over everything that needs a real GPU: smoke, CUDA tests, link probe, "
                    "race windows, the bench's GPU preset against a plain-vs-plain noise floor, NVML PCIe bytes.",
        epilog=f"Parts and their caps: {caps}.")
    p.add_argument("--out", type=Path, required=True, help="folder for gpucheck.json, gpucheck.md and logs/")
    p.add_argument("--budget", type=_int_at_least(MIN_CAP_S), default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole check (default {DEFAULT_BUDGET_S}); a part gets its own cap or "
                        "what is left, whichever is less")
    p.add_argument("--parts", type=_parts, default=PARTS, help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu-small", help="the suite part's bench preset")
    p.add_argument("--repeats", type=_int_at_least(1), default=3, help="suite: timed rounds (default 3)")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, help="suite: untimed rounds (default 1)")
    p.add_argument("--budgets", type=_fractions, default=DEFAULT_BUDGETS,
                   help="suite: policy='auto' budgets as fractions of keep's peak (default 0.7,0.5,0.3)")
    p.add_argument("--test-timeout", type=_int_at_least(1), default=60, help="cuda-tests: seconds per test")
    p.add_argument("--device", default="cuda",
                   help="cuda (default); 'cpu' rehearses the device-independent parts (smoke step, suite) here")
    p.add_argument("--dry-run", action="store_true",
                   help="walk every part's set-up without a device and write placeholder results")
    p.add_argument("--keep-going", action="store_true", help="run the device parts even if smoke finds no CUDA")
    return p


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _not_run(part: Part, status: str, why: str) -> PartResult:
    return PartResult(part.name, part.load().TITLE, status, why, problems=[f"{part.name} {why}"] if status == FAILED else [])


def _meta(args: argparse.Namespace, cfg: CheckConfig, argv: Sequence[str] | None) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc)
    return dict(started=started.isoformat(timespec="seconds"), seconds=0.0, complete=False, budget_s=args.budget,
                dry_run=cfg.dry_run, device=cfg.device, device_name=None, host=platform.node(),
                python=sys.version.split()[0], argv=list(sys.argv[1:] if argv is None else argv),
                commit=_git_commit(), config=dict(preset=cfg.preset, warmup=cfg.warmup, repeats=cfg.repeats,
                                                  budgets=list(cfg.budgets), test_timeout_s=cfg.test_timeout_s))


def run_parts(args: argparse.Namespace, cfg: CheckConfig, meta: dict) -> list[PartResult]:
    """Each part in order under min(its cap, what is left of the budget); both files rewritten after
    every part, so a run killed from outside keeps what it found."""
    t0 = time.monotonic()
    deadline = t0 + args.budget
    results: list[PartResult] = []
    no_cuda = False
    n = len(args.parts)
    for i, part in enumerate(args.parts, 1):
        left = deadline - time.monotonic()
        if no_cuda:
            r = _not_run(part, SKIPPED, "not run: smoke found no CUDA device (--keep-going runs it anyway)")
        elif left < MIN_CAP_S and not cfg.dry_run:
            r = _not_run(part, FAILED, f"not run: {left:.0f} s left of the {args.budget} s budget")
        else:
            cap = part.cap_s if cfg.dry_run else min(part.cap_s, left)
            if not cfg.dry_run:
                print(f"[{i}/{n}] {part.name} (cap {cap:.0f} s) ...", flush=True)
            r = run_part(part, cfg, cap)
        results.append(r)
        print(f"[{i}/{n}] {part.name}: {r.status} in {r.seconds:.0f} s: {r.summary}", flush=True)
        if part.name == "smoke":
            meta["device_name"] = r.figures.get("device_name")
            no_cuda = cfg.on_cuda and r.figures.get("cuda_available") is False and not args.keep_going
        meta.update(seconds=time.monotonic() - t0, complete=i == n)
        write(cfg.out, meta, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    args = build_parser().parse_args(argv)
    cfg = CheckConfig(out=args.out.resolve(), device=args.device, preset=args.preset, warmup=args.warmup,
                      repeats=args.repeats, budgets=args.budgets, test_timeout_s=args.test_timeout,
                      dry_run=args.dry_run)
    cfg.logs.mkdir(parents=True, exist_ok=True)
    (cfg.logs / "config.json").write_text(cfg.to_json())
    print(f"gpucheck: {len(args.parts)} parts, budget {args.budget} s, results in {cfg.out}"
          + (" (dry run)" if cfg.dry_run else ""), flush=True)
    results = run_parts(args, cfg, _meta(args, cfg, argv))

    print("\n" + parts_table(results))
    failed = [r for r in results if r.status == FAILED]
    for r in failed:
        for p in r.problems or [r.summary]:
            print(f"FAILED {r.name}: {p}")
        if r.log:
            print(f"  log: {cfg.out / r.log}")
    print(f"results: {cfg.out / JSON_NAME}, {cfg.out / MARKDOWN_NAME}")
    return 1 if failed else 0
