"""Pipeline parallelism on the CPU: one stage per rank under a `torch.distributed.pipelining`
schedule (GPipe, 1F1B), the stage's module attached with `hc.attach(stage_module)`.

For every schedule and policy each rank trains its stage for `STEPS` schedule steps of `M`
micro-batches, once plain and once attached, from the same weights and seeds, and compares every
gradient of its stage bitwise; its report says how many forwards each step held in flight and
the saved-activation peak measured over all of them. Called by tests/dist/worker.py
(`--cases pp`, or `pp-1f1b`); tests/test_pipeline.py asserts on the results, and

    python -m tests.dist.pipeline DIR

prints each stage's measured saved-activation peak and step time per policy from DIR/rank*.json.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from offload import HybridCheckpointer

WIDTH, SEQ, MB, M, LAYERS, STEPS = 128, 32, 2, 4, 3, 3  # activations of 32-128 KiB per micro-batch
MIN_OFFLOAD = 16 * 1024
SCHEDULES = ("gpipe", "1f1b")
POLICIES = ("keep", "offload", "recompute")
AUTO_SHARE = 0.5  # auto's device budget: this share of keep's measured peak on the stage


class Block(nn.Module):
    """x + drop(down(gelu(up(norm(x))))): dropout, so a replay must restore the RNG."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Stage(nn.Module):
    """One pipeline stage: `LAYERS` blocks (the regions "auto" finds)."""

    def __init__(self, index: int):
        super().__init__()
        torch.manual_seed(index)  # each stage its own weights, the same in every run
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def loss_fn(output, target):
    return F.mse_loss(output, target)


def train(schedule: str, rank: int, world: int, policy=None, **kw) -> dict:
    """`STEPS` steps of the pipeline; with `policy`, the stage attached to a checkpointer."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = Stage(rank)
    hc = attachment = None
    if policy is not None:
        hc = HybridCheckpointer(module, policy=policy, **{"min_offload_bytes": MIN_OFFLOAD, "host_budget": "64MiB", **kw})
        attachment = hc.attach(module)
    try:
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        sched = kind(stage, M, loss_fn=loss_fn)  # every rank gets loss_fn: it switches backward on
        grads, losses = [], []
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(MB * M, SEQ, WIDTH, generator=g), torch.randn(MB * M, SEQ, WIDTH, generator=g)
            torch.manual_seed(100 + step)  # dropout's draws: the runtime must replay them itself
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                out = []
                sched.step(target=y, losses=out)
                losses.append([v.item() for v in out])
            else:
                sched.step()
            grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
            module.zero_grad(set_to_none=True)
        result = {"grads": grads, "losses": losses}
        if hc is not None:
            report = hc.report()
            d = report.to_dict()
            result.update(
                report={k: d[k] for k in ("step", "step_s", "forwards", "in_flight", "kept_bytes", "offloaded_bytes",
                                          "recomputed_bytes", "replays", "saved_peak_bytes", "device_budget",
                                          "d2h_bytes", "h2d_bytes", "fallback_count")},
                text=str(report), attached_forwards=attachment.forwards,
                plan=None if hc.plan is None else [s.action.value for s in hc.plan.segments],
                notes=[] if hc.plan is None else list(hc.plan.notes))
        return result
    finally:
        if attachment is not None:
            attachment.remove()
        if hc is not None:
            hc.close()


def bad_grads(ref: dict, got: dict) -> list[str]:
    bad = [f"losses {a} != {b}" for a, b in zip(ref["losses"], got["losses"]) if a != b]
    for s, (ga, gb) in enumerate(zip(ref["grads"], got["grads"])):
        bad += [f"step {s}: grad of {n}" for n in ga if not torch.equal(ga[n], gb[n])]
    return bad


def pp_cases(rank: int, world: int, schedules: tuple[str, ...] = SCHEDULES) -> dict:
    """Every schedule under keep / offload / recompute, then auto under half of keep's measured
    peak on each stage, against the same pipeline trained plain."""
    out: dict = {}
    try:
        import torch.distributed.pipelining  # noqa: F401
    except ImportError:
        return {"pp-skipped": f"torch {torch.__version__} has no torch.distributed.pipelining"}
    for schedule in schedules:
        try:
            ref = train(schedule, rank, world)
        except Exception:
            out[f"pp-{schedule}-reference"] = {"error": traceback.format_exc()}
            dist.barrier()
            continue
        out[f"pp-{schedule}-reference"] = {"losses": ref["losses"]}
        for policy in POLICIES + ("auto",):
            name = f"pp-{schedule}-{policy}"
            try:
                kw = {}
                if policy == "auto":
                    kw["device_budget"] = int(out[f"pp-{schedule}-keep"]["report"]["saved_peak_bytes"] * AUTO_SHARE)
                got = train(schedule, rank, world, policy, **kw)
                out[name] = {"bad": bad_grads(ref, got), **{k: v for k, v in got.items() if k not in ("grads", "losses")}}
            except Exception:
                out[name] = {"error": traceback.format_exc()}
            dist.barrier()
    return out


def table(ranks: list[dict]) -> str:
    """Per schedule and stage: micro-batches in flight, then each policy's measured peak (MiB)
    and step time (ms) on the report's last step; auto's budget and plan."""
    lines = []
    for schedule in SCHEDULES:
        if f"pp-{schedule}-keep" not in ranks[0]:
            continue
        lines.append(f"{schedule}, {len(ranks)} stages, {M} micro-batches of {MB}x{SEQ}x{WIDTH}, {LAYERS} blocks "
                     f"per stage: saved-activation peak MiB / step ms")
        lines.append(f"{'stage':>5} {'live':>4} " + " ".join(f"{p:>15}" for p in POLICIES + ("auto",))
                     + f" {'auto budget':>11}  auto plan (blocks)")
        for stage, r in enumerate(ranks):
            cells, live = [], None
            for policy in POLICIES + ("auto",):
                res = r.get(f"pp-{schedule}-{policy}", {})
                rep = res.get("report")
                if rep is None:
                    cells.append(f"{'error':>15}")
                    continue
                live = rep["in_flight"]
                cells.append(f"{rep['saved_peak_bytes'] / 2**20:7.2f} / {rep['step_s'] * 1e3:5.0f}")
            auto = r.get(f"pp-{schedule}-auto", {})
            budget = auto.get("report", {}).get("device_budget") or 0
            blocks = (auto.get("plan") or [])[1::2]
            lines.append(f"{stage:>5} {live or '?':>4} " + " ".join(cells) + f" {budget / 2**20:11.2f}  "
                         + " ".join(blocks))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1])
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"), key=lambda f: int(f.stem[4:]))]
    print(table(ranks))


if __name__ == "__main__":
    main()
