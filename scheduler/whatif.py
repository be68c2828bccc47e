"""What if: keep-all, full recompute, offload-all and the planner on a synthetic model.

    python -m scheduler.whatif --model llama3-8b --seq 8192 --hardware h100-pcie \
        [--batch 1] [--budgets 100,70,50,30,15] [--host-budget 64GiB] [--no-flash] \
        [--pp N --microbatches M --schedule {gpipe,1f1b}]

For each device budget (a percentage of the keep-all activation bytes) it prints the
simulated step time and peak memory of the three uniform policies and of `scheduler.plan`,
how much of the budget each peak uses, whether each fits, the plan's mix of actions and the
wall time `scheduler.plan` took (milliseconds, this machine). Everything is predicted from
`synth.transformer_profile`; no GPU is involved.

With --pp (pipeline stages) or --microbatches, the model is cut into stages and the table is
per stage (`scheduler.pipeline`): budgets are per stage, a percentage of the largest keep-all
stage peak; the plan chooses each micro-batch's action on each stage (mix: per stage, one
letter per micro-batch: K keep, O offload, P planned per segment, R recompute, r recompute
with its inputs offloaded).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Sequence, TextIO

from .budget import parse_budget
from .hardware import PRESETS, get_hardware
from .pipeline import Schedule, plan_pipeline, split_stages, uniform_pipeline
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


LEGEND = ("K keep, O offload (tensors moved), R recompute, Ri recompute with its inputs offloaded; "
          "d = reloads issued that many segments ahead of backward")


def _host_budget(text: str) -> int:
    """`--host-budget` as the library parses budgets (a percentage has nothing to refer to here)."""
    try:
        return parse_budget("--host-budget", int(text) if text.strip().isdigit() else text, _no_percentage)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _no_percentage() -> int:
    raise ValueError("--host-budget: a percentage needs the machine's memory; give a size, e.g. 64GiB")


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
    parser.add_argument("--host-budget", type=_host_budget, default=None, metavar="SIZE",
                        help="pinned host budget, read as the library reads one: bytes or '64GiB', "
                             "'512MB' (default: no limit)")
    parser.add_argument("--no-flash", action="store_true", help="eager attention (s^2 terms)")
    parser.add_argument("--pp", type=int, default=1, metavar="N", help="pipeline stages (per-stage table)")
    parser.add_argument("--microbatches", type=int, default=1, metavar="M", help="micro-batches per step")
    parser.add_argument("--schedule", choices=[s.value for s in Schedule], default=Schedule.ONE_F_ONE_B.value,
                        help="pipeline schedule (default 1f1b)")
    args = parser.parse_args(argv)
    if min(args.seq, args.batch, args.pp, args.microbatches) < 1:
        parser.error(f"--seq, --batch, --pp and --microbatches must be >= 1, got {args.seq}, {args.batch}, "
                     f"{args.pp} and {args.microbatches}")

    hw = get_hardware(args.hardware)
    profile = transformer_profile(args.model, hw, seq=args.seq, batch=args.batch,
                                  flash=not args.no_flash)
    host = args.host_budget
    uniform = {"keep-all": plan_uniform(profile, Action.KEEP),
               "full recompute": plan_uniform(profile, Action.RECOMPUTE),
               "offload-all": plan_uniform(profile, Action.OFFLOAD)}
    keep = uniform["keep-all"]
    total = keep.predicted_peak_bytes
    print(f"{args.model}  seq {args.seq}  batch {args.batch}  "
          f"{'eager' if args.no_flash else 'flash'} attention  on {hw.name}: "
          f"D2H {hw.bw_d2h / 1e9:.0f} GB/s, H2D {hw.bw_h2d / 1e9:.0f} GB/s, "
          f"{hw.peak_flops / 1e12:.0f} TFLOP/s x MFU {hw.mfu:.2f}", file=out)
    if args.pp > 1 or args.microbatches > 1:
        return _pipeline(profile, args, host, out)
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
    print(f"\nmix: {LEGEND}", file=out)
    if notes:
        print(file=out)
    for note in notes:
        print(note, file=out)
    return 0


def _pipeline(profile, args, host: int | None, out: TextIO) -> int:
    """The per-stage table of --pp/--microbatches (module docstring)."""
    schedule, m = Schedule(args.schedule), args.microbatches
    try:
        stages = split_stages(profile, args.pp)
    except ValueError as e:
        print(f"error: --pp {args.pp}: {e}", file=out)
        return 2
    uniform = {name: uniform_pipeline(stages, schedule, m, label)
               for name, label in (("keep-all", "K"), ("full recompute", "R"), ("offload-all", "O"))}
    keep = uniform["keep-all"].timeline
    total = max(s.peak_device_bytes for s in keep.stages)
    print(f"pipeline: {args.pp} stages x {m} micro-batches, {schedule.value}; budgets per stage, % of the "
          f"largest keep-all stage peak {total / GiB:.2f} GiB; host budget "
          f"{'none' if host is None else f'{host / GiB:.1f} GiB'} per stage", file=out)
    for i, (p, s) in enumerate(zip(stages, keep.stages)):
        print(f"  stage {i}: {p.segments[0].name} .. {p.segments[-1].name}, per micro-batch forward "
              f"{sum(x.forward_s for x in p.segments):.3f} s, backward {sum(x.backward_s for x in p.segments):.3f} s, "
              f"saves {p.total_saved_bytes / GiB:.2f} GiB; holds up to {s.live} micro-batch"
              f"{'es' if s.live > 1 else ''}", file=out)
    print(file=out)
    rows = [["budget", "GiB", "contender", "step s", "vs keep"] + [f"s{i} GiB" for i in range(len(stages))]
            + ["host GiB", "stall s", "fits", "mix"]]
    notes = []
    for pct in args.budgets:
        budget = int(total * pct / 100)
        ours = plan_pipeline(stages, schedule, m, budget, host)
        notes += [f"plan at {pct:g}%: {n}" for n in ours.notes]
        for i, (name, p) in enumerate(dict(uniform, plan=ours).items()):
            tl = p.timeline
            fits = all(s.peak_device_bytes <= budget and (host is None or s.peak_host_bytes <= host)
                       for s in tl.stages)
            rows.append([f"{pct:g}%" if i == 0 else "", f"{budget / GiB:.2f}" if i == 0 else "", name,
                         f"{tl.step_s:.3f}", f"{100 * (tl.step_s / keep.step_s - 1):+.1f}%"]
                        + [f"{s.peak_device_bytes / GiB:.2f}" for s in tl.stages]
                        + [f"{max(s.peak_host_bytes for s in tl.stages) / GiB:.2f}",
                           f"{max(s.stall_s for s in tl.stages):.3f}", "yes" if fits else "no", p.mix()])
    for line in _table(rows, right={0, 1, 3, 4} | set(range(5, 7 + len(stages)))):
        print(line, file=out)
    if notes:
        print(file=out)
    for note in notes:
        print(note, file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
