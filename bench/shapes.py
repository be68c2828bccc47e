"""`python -m bench.shapes`: policy="auto" over many input shapes, planned from the shape fit.

One model trains a few seeded steps at each of several (batch, sequence) shapes under
policy="auto" at a fixed device budget (a share of keep's measured saved-activation peak at the
largest shape), and the same steps run plain. Per shape it prints how many profiling steps the shape took and
where its plan came from, the fit's saved bytes against the bytes the step saved, the plan's
predicted step time against the measured one, the measured saved-activation peak against the budget, and
whether the gradients equal plain's. The last lines sum the profiling steps against the two per
shape auto took before the fit. Exit status 1 if gradients differ on the CPU or a peak of a
planned step exceeds the budget.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from offload import HybridCheckpointer

from .presets import PRESETS, default_preset

PROFILING_BEFORE = 2  # profiling steps per shape before the fit (warm-up + measured)


def default_shapes(batch: int, seq: int) -> list[tuple[int, int]]:
    """Seven lengths at the preset's batch, then two at twice the batch (a new batch size)."""
    lengths = [seq * k // 8 for k in (8, 6, 4, 7, 5, 3, 2)]
    return [(batch, s) for s in lengths] + [(2 * batch, seq // 2), (2 * batch, seq // 4)]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"2x256,2x192" -> [(2, 256), (2, 192)]."""
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes={text!r}: expected BATCHxSEQ items, e.g. 2x256,2x192")
    return shapes


def run(model, hc, shapes, preset, device, steps: int):
    """Per step: (loss, grads, report or None)."""
    out = []
    for b, s in shapes:
        for k in range(steps):
            idx, tgt = preset.batch_for(device, seed=k, batch=b, seq=s)
            torch.manual_seed(1000 + k)
            with hc if hc is not None else contextlib.nullcontext():
                _, loss = model(idx, tgt)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                        hc.report() if hc is not None else None))
            model.zero_grad(set_to_none=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu (gpu-small on a GPU)")
    ap.add_argument("--shapes", type=parse_shapes, help="BATCHxSEQ,... (default: 7 lengths, then 2 at 2x batch)")
    ap.add_argument("--budget", type=float, default=0.6, help="share of keep's peak at the largest shape")
    ap.add_argument("--steps", type=int, default=3, help="steps per shape (>= 3: two may profile)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset or default_preset(device)]
    shapes = args.shapes or default_shapes(preset.batch, preset.seq)
    preset = preset.with_sizes(seq=max(s for _, s in shapes))
    largest = max(shapes, key=lambda bs: bs[0] * bs[1])
    keep_model = preset.build(device)  # the budget bounds activation memory: keep's saved peak
    keep = HybridCheckpointer(keep_model, policy="keep", min_offload_bytes=preset.min_offload_bytes)
    budget = int(args.budget * run(keep_model, keep, [largest], preset, device, 1)[0][2].saved_peak_bytes)
    keep.close()
    print(f"{preset.name}: {preset.description}; device budget {budget / 2**20:.1f} MiB "
          f"({args.budget:.0%} of keep's peak at {largest[0]}x{largest[1]}), {args.steps} steps per shape")
    ref = run(preset.build(device), None, shapes, preset, device, args.steps)
    model = preset.build(device)
    hc = HybridCheckpointer(model, policy="auto", device_budget=budget, host_budget=preset.host_budget,
                            min_offload_bytes=preset.min_offload_bytes)
    got = run(model, hc, shapes, preset, device, args.steps)
    print(f"{'shape':>9} {'profiled':>8} {'plan from':>9} {'plan':<30} {'saved pred MiB':>14} {'fit err':>8} "
          f"{'step pred/meas':>14} {'peak/budget':>11} {'grads':>8}")
    ok, profiled_before, errors = True, 0, []
    for i, (b, s) in enumerate(shapes):
        rows = got[i * args.steps:(i + 1) * args.steps]
        r = rows[-1][2]
        sh = r.shapes
        profiled, profiled_before = sh["profiling_steps"] - profiled_before, sh["profiling_steps"]
        same = all(torch.equal(a[0], g[0]) and all(torch.equal(x, y) for x, y in zip(a[1], g[1]))
                   for a, g in zip(ref[i * args.steps:(i + 1) * args.steps], rows))
        fitted = rows[0][2].shapes["plan_source"] == "fit"
        err = rows[0][2].shapes["fit_error"] if fitted else None
        if err is not None:
            errors.append(err)
        peak = r.saved_peak_bytes
        ok &= peak <= budget and (same or device.type != "cpu")
        step = r.predicted["step_error"] if r.predicted else None
        saved = sum(g["saved_bytes"] for g in r.predicted["segments"])
        print(f"{b:>3}x{s:<5} {profiled:>8} {'fit' if fitted else 'profile':>9} {r.predicted['mix'][:30]:<30} "
              f"{saved / 2**20:>14.2f} {_pct(err):>8} {_pct(step):>14} "
              f"{peak / budget:>10.0%} {'bitwise' if same else 'DIFFER':>8}")
    n = len(shapes)
    total = got[-1][2].shapes["profiling_steps"]
    print(f"profiling steps: {total} over {n} shapes ({PROFILING_BEFORE * n} at {PROFILING_BEFORE} per shape "
          f"before the fit: {PROFILING_BEFORE * n - total} saved); {len(errors)} shapes planned from the fit, "
          f"saved bytes within {max((abs(e) for e in errors), default=0.0):.2%} of the prediction")
    hc.close()
    return 0 if ok else 1


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


if __name__ == "__main__":
    sys.exit(main())
