"""One rank of the distributed integration tests; launched by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist/worker.py --out DIR

(torchrun sets RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; --standalone picks a free port.)

Backend gloo, CPU only. For every case the rank trains the same model twice from the same initial
weights and seeds, once plain and once under `with hc:`, and compares every gradient bitwise.
Each rank gets different data. A case that raises is recorded with its traceback and the next
case still runs; the rank writes `DIR/rank{R}.json` at the end, which the pytest side asserts on.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from bench.gpt import GPT, GPTConfig, make_batch  # noqa: E402
from offload import HybridCheckpointer  # noqa: E402

# The tests' tiny GPT (tests/conftest.py TINY): activations of 64-256 KiB cross MIN_OFFLOAD.
CFG = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
MIN_OFFLOAD = 16 * 1024
BATCH = 2
STEPS = 2
POLICIES = ("keep", "offload", "recompute")


def new_model() -> GPT:
    torch.manual_seed(0)  # same initial weights on every rank and in every run
    return GPT(CFG)


def checkpointer(model, policy) -> HybridCheckpointer:
    return HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")


def run(model, call, hc, rank: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """STEPS seeded steps of `call` (the module forward is called through) on this rank's data;
    returns the losses and, per step, every parameter's local gradient (a DTensor's local shard)."""
    losses, grads = [], []
    for step in range(STEPS):
        idx, tgt = make_batch(CFG, BATCH, seed=100 * rank + step)  # different data per rank
        torch.manual_seed(1000 + 10 * rank + step)
        if hc is None:
            _, loss = call(idx, tgt)
        else:
            with hc:
                _, loss = call(idx, tgt)
        torch.manual_seed(7)  # the runtime must replay dropout's RNG itself
        loss.backward()
        g = {}
        for name, p in model.named_parameters():
            t = p.grad
            t = t.to_local() if hasattr(t, "to_local") else t
            g[name] = t.detach().clone()
        grads.append(g)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    return losses, grads


def compare(ref, got) -> list[str]:
    bad = [f"step {s}: loss {a!r} != {b!r}" for s, (a, b) in enumerate(zip(ref[0], got[0])) if a != b]
    for s, (ga, gb) in enumerate(zip(ref[1], got[1])):
        bad += [f"step {s}: grad of {n}" for n in ga if not torch.equal(ga[n], gb[n])]
    return bad


def digest(grads: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(grads):
        h.update(name.encode())
        h.update(grads[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def report_of(hc: HybridCheckpointer) -> dict:
    """`hc.report()` after the run, as JSON, or the traceback it raised."""
    try:
        return {"report": {k: v for k, v in hc.report().to_dict().items()
                           if k in ("offloaded_bytes", "recomputed_bytes", "param_bytes", "grad_bytes")}}
    except Exception:
        return {"report_error": traceback.format_exc()}


def stats_of(hc: HybridCheckpointer) -> dict:
    s = hc.stats
    return {k: getattr(s, k) for k in ("kept_bytes", "offloaded_bytes", "recomputed_bytes", "skipped_param_bytes",
                                       "d2h_bytes", "h2d_bytes", "replays", "fallback_count")}


# -- cases -------------------------------------------------------------------------------------------
def ddp_cases(rank: int, world: int) -> dict:
    out = {}
    base = new_model()
    ref_ddp = DDP(copy.deepcopy(base))
    ref = run(ref_ddp.module, ref_ddp, None, rank)
    digests = [None] * world
    dist.all_gather_object(digests, digest(ref[1][-1]))
    out["ddp-reference"] = {"losses": ref[0], "grads_same_on_all_ranks": len(set(digests)) == 1}
    for target in ("inner", "wrapper"):
        for policy in POLICIES:
            name = f"ddp-{target}-{policy}"
            try:
                ddp = DDP(copy.deepcopy(base))
                hc = checkpointer(ddp.module if target == "inner" else ddp, policy)
                try:
                    got = run(ddp.module, ddp, hc, rank)
                    out[name] = {"bad": compare(ref, got), "stats": stats_of(hc),
                                 "regions": [r.name for r in hc.regions], **report_of(hc)}
                finally:
                    hc.close()
            except Exception:
                out[name] = {"error": traceback.format_exc()}
            dist.barrier()
    return out


def fsdp2_cases(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded():
            m = new_model()
            for block in m.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(m, mesh=mesh)
            return m

        ref_model = sharded()
        ref = run(ref_model, ref_model, None, rank)
        out["fsdp2-reference"] = {"losses": ref[0],
                                  "param_type": type(next(ref_model.parameters())).__name__}
    except Exception:
        out["fsdp2-reference"] = {"error": traceback.format_exc()}
        return out
    for policy in POLICIES:
        name = f"fsdp2-{policy}"
        try:
            model = sharded()
            hc = checkpointer(model, policy)
            try:
                got = run(model, model, hc, rank)
                fsdp_stats = stats_of(hc)
                report = report_of(hc)
            finally:
                hc.close()
            plain = new_model()  # the same model and batch without FSDP, in this process alone
            hc1 = checkpointer(plain, policy)
            try:
                run(plain, plain, hc1, rank)
                single_stats = stats_of(hc1)
            finally:
                hc1.close()
            out[name] = {"bad": compare(ref, got), "stats": fsdp_stats, "single_process_stats": single_stats,
                         **report}
        except Exception:
            out[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="ddp,fsdp2")
    args = ap.parse_args()
    torch.set_num_threads(1)  # two ranks on a small shared machine
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank, "world_size": world, "local_world_size": os.environ.get("LOCAL_WORLD_SIZE"),
              "torch": torch.__version__}
    hc = HybridCheckpointer(new_model(), policy="offload")
    result["default_host_budget"] = hc.host_budget
    hc.close()
    try:
        for case in args.cases.split(","):
            result.update({"ddp": ddp_cases, "fsdp2": fsdp2_cases}[case](rank, world))
    finally:
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(result, indent=1))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
