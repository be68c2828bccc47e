"""`python -m bench`: parse the command line, run the sections asked for, print, write JSON and PNG.

Sections: the main bench (every contender: step time, peak memory, traffic, gradients vs plain;
skip with --skip-main), `--max-fit CAP` (largest batch or sequence under a device-memory cap),
`--steps N` (loss curves of a seeded AdamW run vs plain), `--soak N` (what grows over N steps)
and `--budget-use` (policy="auto"'s measured saved peak against its budget, bench/budgetuse.py).
Exit status 1 when, on the CPU, a contender's gradients or losses differ from plain's at all (the
runtime promises bitwise equality), or when a soak's host pool bytes or live tensors grew.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from offload.core.budget import parse_budget

from .budgetuse import FRACTIONS as BUDGET_USE_FRACTIONS, BudgetUseConfig, run_budget_use
from .contenders import Contender, Hybrid, baselines, fixed_policies
from .losscurve import CurveConfig, run_loss_curves
from .maxfit import DIMS, FitConfig, run_maxfit
from .measure import peak_pass
from .plot import plot_frontier
from .presets import PRESETS, Preset, default_preset
from .results import BenchResult, Skipped
from .soak import SoakConfig, run_soak
from .suite import SuiteConfig, attach_auto, auto_contenders, run_suite, runtime_settings
from .tables import Printer, budget_use_table, loss_table, main_table, maxfit_table, skipped_lines, soak_table

log = logging.getLogger("bench")

DEFAULT_BUDGETS = (0.7, 0.5, 0.3)
FIT_REPEATS = 3  # timed steps at each contender's largest size (after its warm-up)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets={text!r}: expected fractions like 0.7,0.5,0.3") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--budgets={text!r}: each fraction must be in (0, 1]")
    return values


def _int_at_least(minimum: int):
    """An argparse type: an int >= `minimum`, with an error that names the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _device(text: str) -> torch.device:
    """An argparse type: 'cpu', 'cuda' or 'cuda:N', as a torch.device."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {text!r}: not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device {text!r}: the bench runs on 'cpu' or 'cuda' ('cuda:N'), "
                                         f"not {device.type}")
    return device


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench`."""
    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark activation keep / offload / recompute against torch's checkpointing on "
                    "one seeded model: step time, peak memory, traffic, gradients vs plain.",
        epilog=f"Presets: {presets}.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="workload (default: 'cpu' on the CPU, 'gpu-small' on CUDA; 'quick' with --quick)")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="compute device: cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a few-second run: the tiny preset (unless --preset), 1 warm-up and 1 timed round")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for results.json and "
                                                                        "frontier.png (default: bench_out/)")
    p.add_argument("--repeats", type=_positive, help="timed rounds per contender (default 10; 1 with --quick)")
    p.add_argument("--warmup", type=_non_negative, help="untimed rounds first (default 2; 1 with --quick)")
    p.add_argument("--budgets", type=_fractions, default=DEFAULT_BUDGETS,
                   help="policy='auto' device budgets as fractions of keep's peak (main bench) or of "
                        "the cap (--max-fit); default 0.7,0.5,0.3")
    p.add_argument("--host-budget", metavar="SIZE",
                   help="pinned host memory each of our contenders may hold (bytes, or '64MiB'), instead "
                        "of the preset's; a small one leaves 'auto' keep, recompute and selective recompute")
    p.add_argument("--skip-main", action="store_true",
                   help="run only the sections asked for (--max-fit, --steps, --soak, --budget-use)")
    p.add_argument("--max-fit", metavar="CAP",
                   help="device-memory cap (bytes, or '512MiB'): find each contender's largest size under it")
    p.add_argument("--fit-dim", choices=DIMS, default="batch", help="what --max-fit grows (default batch)")
    p.add_argument("--fit-max", type=_positive,
                   help="largest size --max-fit tries (default: 1024 for batch, 8x the preset's for seq)")
    p.add_argument("--steps", type=_positive, metavar="N",
                   help="loss-curve check: N seeded AdamW steps under plain and each of our policies")
    p.add_argument("--soak", type=_positive, metavar="N",
                   help="N training steps per policy of ours, each with an evaluation forward under "
                        "`with hc:` and one under no_grad, then N such evaluation pairs alone: growth of "
                        "host pool bytes, live tensors, Python objects and blocks, and RSS between an "
                        "early step and the end")
    p.add_argument("--budget-use", type=_fractions, nargs="?", metavar="FRACTIONS",
                   const=BUDGET_USE_FRACTIONS,
                   help="policy='auto' at these fractions of keep's measured saved-activation peak "
                        f"(default {','.join(map(str, BUDGET_USE_FRACTIONS))}): measured saved peak / "
                        "budget, the plan's peak / budget and step time against plain, next to keep "
                        "and recompute")
    p.add_argument("--threads", type=_positive,
                   help="torch intra-op threads (default on the CPU: one per core less one, which the "
                        "emulation's copy threads use the way a GPU uses its copy engines, and which "
                        "keeps other jobs on a small machine from stalling every step; on CUDA: "
                        "torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")
    return p


def _meta(preset: Preset, device: torch.device, args: argparse.Namespace) -> dict:
    return dict(
        preset=preset.name, description=preset.description, model=type(preset.config).__name__,
        config=dataclasses.asdict(preset.config),
        batch=preset.batch, seq=preset.seq, tokens_per_step=preset.tokens, dtype=str(preset.dtype),
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        torch=torch.__version__, threads=torch.get_num_threads(), warmup=args.warmup, repeats=args.repeats,
        min_offload_bytes=preset.min_offload_bytes, host_budget=preset.host_budget,
        auto_budget_fractions=list(args.budgets),
        step="forward + backward from cleared gradients on one fixed batch, RNG seeded; no optimizer step",
        timing="median of the timed rounds; contenders interleaved round-robin (each round starting one "
               "further on); warm-up rounds excluded; ratio_to_plain: median over rounds of step / plain's "
               "step in the same round",
        memory="offload.PeakMemory over one step, in a separate pass: device bytes above the step's "
               "starting level (activations, gradients, temporaries); CPU: torch profiler memory events",
        grads="every parameter gradient vs plain's on the same seeded batch (torch.equal)")


def _keep_peak(preset: Preset, device: torch.device) -> int:
    """Peak bytes of one step under policy="keep" (what the auto budgets are fractions of)."""
    att = Hybrid("keep", runtime_settings(preset)).attach(preset.build(device), preset.blocks)
    peak, _ = peak_pass(att, preset.batch_for(device), device)
    att.close()
    return peak


def _available_autos(preset: Preset, device: torch.device, fractions: Sequence[float], keep_peak: int,
                     printer: Printer) -> list[Contender]:
    base = preset.build(device)
    out: list[Contender] = []
    for c in auto_contenders(tuple(fractions), keep_peak, runtime_settings(preset)):
        probe = attach_auto(c, copy.deepcopy(base), preset.blocks, preset.batch_for(device))
        if isinstance(probe, Skipped):
            printer.line(f"skipped {probe.name}: {probe.reason}")
        else:
            probe.close()
            out.append(c)
    return out


@dataclass
class Run:
    """What every section of one invocation shares."""

    args: argparse.Namespace
    preset: Preset
    device: torch.device
    printer: Printer
    result: BenchResult
    problems: list[str] = field(default_factory=list)  # correctness failures (exit status 1)

    @property
    def bitwise(self) -> bool:
        """Gradients and losses must equal plain's exactly (the CPU, whose ops are deterministic)."""
        return self.device.type == "cpu"

    @property
    def progress(self) -> bool:
        return not self.args.no_progress


def run_main_section(run: Run) -> None:
    """Every contender: time, memory, traffic, gradients; the table and the frontier PNG."""
    args, preset = run.args, run.preset
    title = f"{preset.name} on {run.device}: {preset.batch} x {preset.seq} tokens, {preset.dtype}"
    log.info("bench %s: %s", title, preset.description)
    run.result.contenders, run.result.skipped = run_suite(SuiteConfig(
        preset, run.device, args.warmup, args.repeats, args.budgets, run.progress))
    rows = list(run.result.contenders.values())
    run.printer.section(f"{title}; step = forward + backward (no optimizer); median of {args.repeats}, "
                        f"{args.warmup} warm-up; x plain = median of per-round ratios", main_table(rows))
    if run.result.skipped:
        run.printer.line(skipped_lines(run.result.skipped))
    if run.bitwise:
        run.problems += [f"{r.name}: gradients differ from plain (max abs diff {r.grads_max_abs_diff:.3g})"
                         for r in rows if not r.grads_match]
    png = args.out / "frontier.png"
    if plot_frontier(rows, png, title):
        run.printer.line(f"frontier plot: {png}")
    else:
        run.printer.line("frontier plot skipped: matplotlib is not installed (pip install -e '.[plot]')")


def run_maxfit_section(run: Run, cap: int) -> None:
    """`--max-fit`: the largest batch or sequence per contender under `cap` bytes."""
    args, preset = run.args, run.preset
    upper = args.fit_max or (1024 if args.fit_dim == "batch" else 8 * preset.seq)
    fits, skipped = run_maxfit(FitConfig(preset, run.device, cap, args.fit_dim, upper, args.warmup,
                                         min(args.repeats, FIT_REPEATS), args.budgets, run.progress),
                               baselines() + fixed_policies(runtime_settings(preset)))
    run.result.max_fit = dict(cap_bytes=cap, dim=args.fit_dim, upper=upper, results=fits, skipped=skipped)
    fixed = f"seq fixed at {preset.seq}" if args.fit_dim == "batch" else f"batch fixed at {preset.batch}"
    run.printer.section(f"largest {args.fit_dim} under a cap of {cap / 2**20:.1f} MiB ({preset.name}, {fixed}; "
                        f"'+' = reached --fit-max {upper})", maxfit_table(fits, args.fit_dim))
    if skipped:
        run.printer.line(skipped_lines(skipped))


def run_steps_section(run: Run) -> None:
    """`--steps N`: loss curves of plain and each policy of ours; on the CPU they must be equal."""
    preset, device = run.preset, run.device
    keep = run.result.contenders.get("keep")
    keep_peak = keep.peak_bytes if keep is not None else _keep_peak(preset, device)
    ours = fixed_policies(runtime_settings(preset))
    ours += _available_autos(preset, device, run.args.budgets, keep_peak, run.printer)
    curves = run_loss_curves(CurveConfig(preset, device, run.args.steps, progress=run.progress), ours)
    run.result.loss_curve = dict(steps=run.args.steps, optimizer="AdamW(lr=1e-3)", curves=curves)
    run.printer.section(f"loss curves, {run.args.steps} seeded AdamW steps ({preset.name})", loss_table(curves))
    if run.bitwise:
        run.problems += [f"{c.name}: loss curve differs from plain by {c.max_abs_diff:.3g}"
                         for c in curves if c.max_abs_diff != 0]


def run_soak_section(run: Run) -> None:
    """`--soak N`: each fixed policy and policy="auto" at the smallest --budgets fraction of keep's
    peak; the host pool and the live tensors must not grow."""
    preset, device = run.preset, run.device
    keep = run.result.contenders.get("keep")
    keep_peak = keep.peak_bytes if keep is not None else _keep_peak(preset, device)
    settings = runtime_settings(preset)
    contenders = fixed_policies(settings) + auto_contenders((min(run.args.budgets),), keep_peak, settings)
    cfg = SoakConfig(preset, device, run.args.soak, progress=run.progress)
    results = run_soak(cfg, contenders)
    run.result.soak = dict(steps=cfg.steps, early_step=cfg.early, results=results)
    run.printer.section(f"soak ({preset.name}): {cfg.steps} AdamW steps, each with an evaluation forward "
                        f"under `with hc:` and one under no_grad, then {cfg.steps} such evaluation pairs "
                        f"alone; growth from after step {cfg.early + 1} to the end", soak_table(results))
    for r in results:
        g = r.growth
        if g.pool_bytes or g.tensors > 0:
            run.problems.append(f"soak {r.name}: the host pool grew by {g.pool_bytes} bytes and live tensors "
                                f"by {g.tensors} between step {cfg.early + 1} and the end")


def run_budget_use_section(run: Run) -> None:
    """`--budget-use`: auto's measured saved peak against each budget, next to keep and recompute."""
    preset = run.preset
    rows, skipped, reference = run_budget_use(BudgetUseConfig(
        preset, run.device, run.args.budget_use, run.args.warmup, run.args.repeats, run.progress))
    run.result.budget_use = dict(keep_saved_peak_bytes=reference, fractions=list(run.args.budget_use),
                                 rows=rows)
    run.printer.section(f"budget use ({preset.name}): policy='auto' at fractions of keep's saved-activation "
                        f"peak ({reference / 2**20:.1f} MiB); saved peak measured by the runtime on the last "
                        f"timed step; planned = the plan's peak with backward's working sets; median of "
                        f"{run.args.repeats}", budget_use_table(rows))
    if skipped:
        run.printer.line(skipped_lines(skipped))
    infeasible = [r.name for r in rows if r.planned_peak_bytes is not None and r.planned_peak_bytes > r.device_budget]
    if infeasible:
        run.printer.line(f"below the least-memory plan (planned / budget > 1; the runtime warned and ran that "
                         f"plan): {', '.join(infeasible)}")
    run.problems += [f"{r.name}: measured saved peak {r.saved_peak_bytes} over its budget {r.device_budget} "
                     f"where its plan fits" for r in rows
                     if r.name not in infeasible and r.use is not None and r.use > 1]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; returns the exit status (0 ok, 1 a correctness check failed, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {str(device)!r}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices here "
                     f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    cap = None
    if args.max_fit is not None:
        try:
            cap = parse_budget("--max-fit", args.max_fit, lambda: _device_total(device))
        except ValueError as e:
            parser.error(str(e))
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    threads = args.threads or (cpu_threads() if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    preset = PRESETS[args.preset or ("quick" if args.quick else default_preset(device))]
    if args.host_budget is not None:
        preset = dataclasses.replace(preset, host_budget=args.host_budget)
    args.repeats = args.repeats or (1 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args, preset, device, Printer(), BenchResult(_meta(preset, device, args)))

    if not args.skip_main:
        run_main_section(run)
    if cap is not None:
        run_maxfit_section(run, cap)
    if args.steps is not None:
        run_steps_section(run)
    if args.soak is not None:
        run_soak_section(run)
    if args.budget_use is not None:
        run_budget_use_section(run)

    path = args.out / "results.json"
    run.result.write_json(path)
    run.printer.line(f"results: {path}")
    for p in run.problems:
        log.error("FAILED: %s", p)
    return 1 if run.problems else 0


def cpu_threads() -> int:
    """Intra-op threads for a CPU run: all of torch's default but one, left to the copy threads."""
    return max(1, torch.get_num_threads() - 1)


def _device_total(device: torch.device) -> int:
    """What a percentage in --max-fit refers to: the device's total memory (CUDA only)."""
    if device.type != "cuda":
        raise ValueError("--max-fit: a percentage needs a CUDA device; give bytes, e.g. 512MiB")
    return torch.cuda.get_device_properties(device).total_memory
