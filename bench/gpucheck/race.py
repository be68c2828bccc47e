"""The race part: open every race window Rule 2 (DESIGN.md §4) guards and check that gradients
stay bitwise equal to plain's, then check that the same windows catch a backend that breaks it.

Windows, each under policy "offload" and "recompute" (dropout on: the replay must redraw the
same masks):
  - side streams delayed: every D2H and H2D copy starts late (`CudaBackend`'s delay knobs), so
    a source reused or a host block reloaded before its copy ended would be corrupt;
  - compute stream delayed: `torch.cuda._sleep` on the compute stream before every `nn.Linear`
    (the producers of the offloaded tensors) and before each of their output gradients, so a D2H
    not ordered after the compute stream copies bytes not yet written, and a reload not ordered
    after it overwrites memory still in use;
  - both.
The negative control runs the compute-delayed window with `SkipsComputeWait`, a backend whose
D2H does not wait for the compute stream: its gradients must differ, or the windows are too
narrow to prove anything. The model is the embedded GPT in float32 with explicit softmax
attention: its CUDA backward has no atomics, so plain is bitwise repeatable (checked too).
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

import offload

from ..contenders import Attached, Plain
from ..gpt import GPT, GPTConfig
from ..measure import STEP_SEED, compare_grads, step
from ..presets import Preset
from ..tables import format_table
from .config import CheckConfig
from .outcome import Finding
from .seams import CudaBackend

TITLE = "race windows: delayed side streams and compute stream, gradients vs plain"
MODEL = Preset("race", "GPT 6 x 512-wide, 8 x 256 tokens, float32, dropout 0.1",
               GPTConfig(vocab_size=1024, block_size=256, n_layer=6, n_head=8, n_embd=512, dropout=0.1),
               GPT, "transformer.h", batch=8, seq=256, min_offload_bytes=64 << 10, host_budget="4GiB")
STEPS = 2  # each on its own batch: stale bytes from the step before cannot pass for fresh ones
SIDE_DELAY_CYCLES = 5_000_000  # per copy; ~2.5 ms at an H200's ~2 GHz
COMPUTE_DELAY_CYCLES = 2_000_000  # per Linear forward and per Linear output gradient; ~1 ms
POLICIES = ("offload", "recompute")


@dataclass(frozen=True)
class Window:
    """Which streams are delayed, in GPU cycles (`torch.cuda._sleep`)."""

    name: str
    side_cycles: int
    compute_cycles: int


WINDOWS = (Window("side streams delayed", SIDE_DELAY_CYCLES, 0),
           Window("compute delayed", 0, COMPUTE_DELAY_CYCLES),
           Window("both delayed", SIDE_DELAY_CYCLES, COMPUTE_DELAY_CYCLES))


class ComputeDelay:
    """`with ComputeDelay(model, cycles):` spins the compute stream for `cycles` before every
    `nn.Linear` of `model` runs forward and before its output's gradient is used in backward.
    The sleeps change no value, so a plain run under the same delays is the reference."""

    def __init__(self, model: nn.Module, cycles: int):
        self.model = model
        self.cycles = cycles
        self._handles: list = []

    def _sleep(self, *_args) -> None:
        torch.cuda._sleep(self.cycles)

    def _on_output(self, _module, _inputs, out) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._sleep_then_pass)

    def _sleep_then_pass(self, grad: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)
        return grad

    def __enter__(self) -> "ComputeDelay":
        if self.cycles:
            for m in self.model.modules():
                if isinstance(m, nn.Linear):
                    self._handles += [m.register_forward_pre_hook(self._sleep), m.register_forward_hook(self._on_output)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class SkipsComputeWait(CudaBackend):
    """A deliberately broken backend, the negative control: each D2H is issued while an idle
    stream is current, so its side stream waits on that stream instead of the compute stream."""

    def __init__(self, device: torch.device, **delays: int):
        super().__init__(device, **delays)
        self._idle = torch.cuda.Stream(self.device)

    def d2h(self, src: torch.Tensor, dsts: Sequence[torch.Tensor], label: str = ""):
        """`CudaBackend.d2h`, with the idle stream standing in for the compute stream."""
        with torch.cuda.stream(self._idle):
            return super().d2h(src, dsts, label)


def train(att: Attached, device: torch.device, steps: int = STEPS) -> list[list[torch.Tensor | None]]:
    """`steps` seeded steps, each on its own batch; the gradients after each."""
    grads = []
    for s in range(steps):
        step(att, MODEL.batch_for(device, seed=s), seed=STEP_SEED + s)
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in att.params])
    return grads


def compare_runs(ref: Sequence[list], got: Sequence[list]) -> tuple[bool, float]:
    """(bitwise equal at every step, largest absolute difference) of two runs' gradients."""
    pairs = [compare_grads(a, b) for a, b in zip(ref, got)]
    return all(m for m, _ in pairs) and len(ref) == len(got), max((d for _, d in pairs), default=0.0)


def run_arm(device: torch.device, policy: str | None, backend: CudaBackend | None,
            compute_cycles: int) -> tuple[list[list], dict]:
    """A fresh seeded model under `policy` (None: plain) with `backend`, the compute stream delayed
    by `compute_cycles`: (gradients per step, the runtime's last report)."""
    model = MODEL.build(device)
    if policy is None:
        att = Plain().attach(model, MODEL.blocks)
    else:
        hc = offload.HybridCheckpointer(model, policy=policy, backend=backend, host_budget=MODEL.host_budget,
                                        min_offload_bytes=MODEL.min_offload_bytes)
        att = Attached(model, list(model.parameters()), context=lambda: hc, runtime=hc)
    with ComputeDelay(model, compute_cycles):
        grads = train(att, device)
    report = att.report()
    att.close()
    del att, model
    gc.collect()
    return grads, report


def plan(cfg: CheckConfig) -> dict:
    arms = [dict(window=w.name, policy=p) for w in WINDOWS for p in POLICIES]
    return dict(model=MODEL.description, steps=STEPS, windows=[asdict(w) for w in WINDOWS], arms=arms,
                control=dict(window="compute delayed", policy="offload", backend=SkipsComputeWait.__name__))


def _moved(policy: str, report: dict) -> bool:
    key = "offloaded_bytes" if policy == "offload" else "recomputed_bytes"
    return bool(report.get(key))


def run(cfg: CheckConfig, cap_s: float) -> Finding:
    if not cfg.on_cuda:
        return Finding("skipped: needs a CUDA device", skipped=f"needs a CUDA device (--device {cfg.device})")
    device = torch.device(cfg.device)
    problems, rows = [], []
    ref, _ = run_arm(device, None, None, 0)
    again, _ = run_arm(device, None, None, COMPUTE_DELAY_CYCLES)
    plain_repeatable, plain_diff = compare_runs(ref, again)
    if not plain_repeatable:
        problems.append(f"plain itself is not bitwise repeatable here (max abs diff {plain_diff:.3g}): "
                        f"the bitwise criterion below means nothing on this machine")
    for w in WINDOWS:
        for policy in POLICIES:
            backend = CudaBackend(device, d2h_delay_cycles=w.side_cycles, h2d_delay_cycles=w.side_cycles)
            grads, report = run_arm(device, policy, backend, w.compute_cycles)
            bitwise, diff = compare_runs(ref, grads)
            moved = _moved(policy, report)
            rows.append(dict(window=w.name, policy=policy, bitwise=bitwise, max_abs_diff=diff, moved=moved,
                             offloaded_bytes=report.get("offloaded_bytes"),
                             recomputed_bytes=report.get("recomputed_bytes"), stall_s=report.get("stall_s")))
            if not bitwise:
                problems.append(f"{policy}, {w.name}: gradients differ from plain by {diff:.3g}")
            if not moved:
                problems.append(f"{policy}, {w.name}: nothing was {policy}ed, so nothing was checked")
    grads, _ = run_arm(device, "offload", SkipsComputeWait(device), COMPUTE_DELAY_CYCLES)
    control_caught = not compare_runs(ref, grads)[0]
    if not control_caught:
        problems.append("the negative control (a D2H that does not wait for the compute stream) gave bitwise "
                        "gradients: the compute delay opens no window, the compute-delayed arms prove nothing")
    ok = sum(r["bitwise"] for r in rows)
    summary = (f"{ok}/{len(rows)} arms bitwise; negative control {'caught' if control_caught else 'NOT caught'}; "
               f"plain {'repeatable' if plain_repeatable else 'NOT repeatable'}")
    return Finding(summary, dict(rows=rows, plain_repeatable=plain_repeatable, plain_max_abs_diff=plain_diff,
                                 control_caught=control_caught), problems)


def markdown(figures: dict) -> str:
    rows = [[r["window"], r["policy"], "bitwise" if r["bitwise"] else f"diff {r['max_abs_diff']:.2e}",
             f"{(r['offloaded_bytes'] or 0) / 2**20:.1f}", f"{(r['recomputed_bytes'] or 0) / 2**20:.1f}"]
            for r in figures.get("rows", [])]
    table = format_table(["window", "policy", "grads vs plain", "offload MiB", "recomp MiB"], rows)
    return (f"```\n{table}\n```\nplain repeatable: {figures.get('plain_repeatable')}; "
            f"negative control caught: {figures.get('control_caught')}")
