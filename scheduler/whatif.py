"""What if: keep-all, full recompute, offload-all and the planner on a synthetic model.

    python -m scheduler.whatif --model llama3-8b --seq 8192 --hardware h100-pcie \
        [--batch 1] [--budgets 100,70,50,30,15] [--host-budget GIB] [--no-flash]

For each device budget (a percentage of the keep-all activation bytes) it prints the
simulated step time and peak memory of the three uniform policies and of `scheduler.plan`,
how much of the budget each peak uses, whether each fits, the plan's mix of actions and the
wall time `scheduler.plan` took (milliseconds, this machine). Everything is predicted from
`synth.transformer_profile`; no GPU is involved.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Sequence, TextIO

from .hardware import PRESETS, get_hardware
from .plan import Action, Plan
from .planner import plan, plan_uniform
from .synth import MODELS, transformer_profile

GiB = 1 << 30
DEFAULT_BUDGETS = "100,70,50,30,15"


def _percentages(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets: expected percentages such as "
                                         f"{DEFAULT_BUDGETS!r}, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--budgets: percentages must be > 0, got {text!r}")
    return values


def mix(p: Plan) -> str:
    """The plan's actions in short: K keep, O offload (tensor count), R recompute, Ri recompute
    with offloaded inputs, and the lookahead d."""
    counts = Counter("Ri" if sp.offload_inputs else sp.action.name[0] for sp in p.segments)
    parts = [f"{k}{counts[k]}" for k in ("K", "O", "R", "Ri") if counts[k]]
    if p.offload_ids:
        parts.append(f"({len(p.offload_ids)} tensors)")
    return " ".join(parts + [f"d={p.lookahead}"])


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Parse `argv`, run the sweep and print the table to `out` (stdout by default)."""
    out = sys.stdout if out is None else out
    parser = argparse.ArgumentParser(prog="python -m scheduler.whatif", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--seq", type=int, required=True, help="sequence length, tokens")
    parser.add_argument("--hardware", required=True, choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size")
    parser.add_argument("--budgets", type=_percentages, default=_percentages(DEFAULT_BUDGETS),
                        help="device budgets, percent of keep-all activation bytes")
    parser.add_argument("--host-budget", type=float, default=None, metavar="GIB",
                        help="pinned host budget in GiB (default: no limit)")
    parser.add_argument("--no-flash", action="store_true", help="eager attention (s^2 terms)")
    args = parser.parse_args(argv)
    if args.seq < 1 or args.batch < 1:
        parser.error(f"--seq and --batch must be >= 1, got {args.seq} and {args.batch}")
    if args.host_budget is not None and args.host_budget < 0:
        parser.error(f"--host-budget must be >= 0 GiB, got {args.host_budget}")

    hw = get_hardware(args.hardware)
    profile = transformer_profile(args.model, hw, seq=args.seq, batch=args.batch,
                                  flash=not args.no_flash)
    host = None if args.host_budget is None else int(args.host_budget * GiB)
    uniform = {"keep-all": plan_uniform(profile, Action.KEEP),
               "full recompute": plan_uniform(profile, Action.RECOMPUTE),
               "offload-all": plan_uniform(profile, Action.OFFLOAD)}
    keep = uniform["keep-all"]
    total = keep.predicted_peak_bytes
    print(f"{args.model}  seq {args.seq}  batch {args.batch}  "
          f"{'eager' if args.no_flash else 'flash'} attention  on {hw.name}: "
          f"D2H {hw.bw_d2h / 1e9:.0f} GB/s, H2D {hw.bw_h2d / 1e9:.0f} GB/s, "
          f"{hw.peak_flops / 1e12:.0f} TFLOP/s x MFU {hw.mfu:.2f}", file=out)
    print(f"keep-all activations {total / GiB:.2f} GiB over {len(profile.segments)} segments; "
          f"host budget {'none' if host is None else f'{host / GiB:.1f} GiB'}", file=out)
    print(file=out)
    rows = [["budget", "GiB", "contender", "step s", "vs keep", "peak GiB", "of budget",
             "host GiB", "fits", "plan ms", "mix"]]
    notes = []
    for pct in args.budgets:
        budget = int(total * pct / 100)
        start = time.perf_counter()
        ours = plan(profile, budget, host, hw)
        plan_ms = 1e3 * (time.perf_counter() - start)
        notes += [f"plan at {pct:g}%: {n}" for n in ours.notes]
        contenders = dict(uniform, plan=ours)
        for i, (name, p) in enumerate(contenders.items()):
            fits = p.predicted_peak_bytes <= budget and (host is None
                                                        or p.predicted_host_bytes <= host)
            rows.append([f"{pct:g}%" if i == 0 else "", f"{budget / GiB:.2f}" if i == 0 else "",
                         name, f"{p.predicted_step_s:.3f}",
                         f"{100 * (p.predicted_step_s / keep.predicted_step_s - 1):+.1f}%",
                         f"{p.predicted_peak_bytes / GiB:.2f}",
                         f"{100 * p.predicted_peak_bytes / budget:.0f}%" if budget else "-",
                         f"{p.predicted_host_bytes / GiB:.2f}", "yes" if fits else "no",
                         f"{plan_ms:.0f}" if p is ours else "", mix(p)])
    for line in _table(rows, right={0, 1, 3, 4, 5, 6, 7, 9}):
        print(line, file=out)
    if notes:
        print(file=out)
    for note in notes:
        print(note, file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
