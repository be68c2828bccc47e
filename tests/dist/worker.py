"""One rank of the distributed integration tests; launched by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist/worker.py --out DIR

(torchrun sets RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; --standalone picks a free port.)

Backend gloo, CPU only. For every case the rank trains the same model twice from the same initial
weights and seeds, once plain and once under `with hc:`, and compares every gradient bitwise.
Each rank gets different data (under tensor parallelism, where the ranks of a TP group share
their batch, the same data and seeds). A case that raises is recorded with its traceback and the
next case still runs; the rank writes `DIR/rank{R}.json` at the end, which the pytest side asserts on.
"""
from __future__ import annotations

import argparse
import contextlib
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
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from bench.gpt import GPT, GPTConfig, make_batch  # noqa: E402
from offload import Action, HybridCheckpointer, RegionSite  # noqa: E402
from tests.dist.pipeline import pp_cases  # noqa: E402

# The tests' tiny GPT (tests/conftest.py TINY): activations of 64-256 KiB cross MIN_OFFLOAD.
CFG = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
MIN_OFFLOAD = 16 * 1024
BATCH = 2
STEPS = 2
POLICIES = ("keep", "offload", "recompute")


def new_model() -> GPT:
    torch.manual_seed(0)  # same initial weights on every rank and in every run
    return GPT(CFG)


def checkpointer(model, policy, **kw) -> HybridCheckpointer:
    kw.setdefault("host_budget", "64MiB")
    return HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, **kw)


def run(model, call, hc, rank: int, steps: int = STEPS, data=None,
        backwards: int = 1) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """`steps` seeded steps of `call` (the module forward is called through) on this rank's data
    (`data(seed)` -> the call's inputs; default the GPT's batches), each with `backwards`
    backward passes (retain_graph=True but the last); returns the losses and, per step, every
    parameter's local gradient (a DTensor's local shard)."""
    data = data or (lambda seed: make_batch(CFG, BATCH, seed=seed))
    losses, grads = [], []
    for step in range(steps):
        idx, tgt = data(100 * rank + step)  # different data per rank
        torch.manual_seed(1000 + 10 * rank + step)
        if hc is None:
            _, loss = call(idx, tgt)
        else:
            with hc:
                _, loss = call(idx, tgt)
        torch.manual_seed(7)  # the runtime must replay dropout's RNG itself
        for i in range(backwards):
            loss.backward(retain_graph=i < backwards - 1)
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


def under(hc):
    return contextlib.nullcontext() if hc is None else hc


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


# -- tensor parallelism ------------------------------------------------------------------------------
TP_WIDTH, TP_SEQ, TP_LAYERS, TP_STEPS = 128, 64, 4, 4  # shards of 32-128 KiB cross MIN_OFFLOAD
TP_POLICIES = ("keep", "offload", "recompute", "auto")


class TPBlock(nn.Module):
    """An attention-free block, x + drop(down(gelu(up(norm(x))))): up column-, down row-parallel."""

    def __init__(self, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(TP_WIDTH)
        self.up = nn.Linear(TP_WIDTH, 4 * TP_WIDTH)
        self.down = nn.Linear(4 * TP_WIDTH, TP_WIDTH)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class TPStack(nn.Module):
    """TPBlocks between a replicated input and a replicated loss. Under sequence parallelism
    (`mesh` set) the residual stream is a DTensor sharded on the sequence dimension."""

    def __init__(self, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(TPBlock(dropout) for _ in range(TP_LAYERS))
        self.norm = nn.LayerNorm(TP_WIDTH)
        self.mesh = None

    def forward(self, x, tgt):
        from torch.distributed.tensor import DTensor, Replicate, Shard
        if self.mesh is not None:
            x = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False).redistribute(self.mesh, [Shard(1)])
        for block in self.blocks:
            x = block(x)
        if self.mesh is not None:
            x = x.redistribute(self.mesh, [Replicate()]).to_local()
        return None, F.mse_loss(self.norm(x), tgt)


def tp_model(mesh, sequence_parallel: bool, dropout: float = 0.1) -> TPStack:
    """The same initial weights on every rank, then sharded: Megatron's MLP split (+ SP norms)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)
    torch.manual_seed(0)
    model = TPStack(dropout)
    if sequence_parallel:
        model.mesh = mesh
        plan = {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
                "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    else:
        plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
    return model


def tp_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, TP_SEQ, TP_WIDTH, generator=g),
            torch.randn(BATCH, TP_SEQ, TP_WIDTH, generator=g))


def saved_storages(model) -> dict:
    """Every distinct storage autograd saves in one plain forward of the TP stack, keyed as
    Rule 4 says (a DTensor by its local shard's storage): the block that first saved it (-1
    before the blocks, n - 0.5 after block n - 1), its bytes, whether it holds a parameter, and
    whether a DTensor saved it; and the bytes of each block's input."""
    from torch.distributed.tensor import DTensor
    from torch.multiprocessing.reductions import StorageWeakRef

    def shard(t):
        return t._local_tensor if isinstance(t, DTensor) else t

    params = {shard(p).untyped_storage()._cdata for p in model.parameters()}
    where = [-1]
    seen: dict = {}
    inputs = []

    def pack(t):
        s = shard(t).untyped_storage()
        entry = seen.setdefault(StorageWeakRef(s), {"block": where[0], "nbytes": s.nbytes(),
                                                     "param": s._cdata in params, "dtensor": False})
        entry["dtensor"] |= isinstance(t, DTensor)
        return t

    def enter(i, x):
        where[0] = i
        inputs.append(shard(x).untyped_storage().nbytes())

    hooks = [b.register_forward_pre_hook(lambda m, a, _i=i: enter(_i, a[0])) for i, b in enumerate(model.blocks)]
    hooks += [b.register_forward_hook(lambda m, a, o, _i=i: where.__setitem__(0, _i + 0.5))
              for i, b in enumerate(model.blocks)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*tp_batch(0))
    finally:
        for h in hooks:
            h.remove()
    return {"storages": list(seen.values()), "block_inputs": inputs}


def attempt(out: dict, name: str, case) -> None:
    """out[name] = case(), or the traceback it raised; then the ranks meet again."""
    try:
        out[name] = case()
    except Exception:
        out[name] = {"error": traceback.format_exc()}
    dist.barrier()


def tp_train(mesh, sp: bool, policy, ref, rank: int, backwards: int = 1, **kw) -> dict:
    """The TP stack trained under `policy`, compared with `ref` (the same stack trained plain)."""
    model = tp_model(mesh, sp)
    hc = checkpointer(model, policy, **kw)
    try:
        got = run(model, model, hc, 0, TP_STEPS, tp_batch, backwards)
        report = hc.report().to_dict()
        return {"bad": compare(ref, got), "stats": stats_of(hc), "regions": [r.name for r in hc.regions],
                "plan": None if hc.plan is None else [s.action.value for s in hc.plan.segments],
                "selective": 0 if hc.plan is None else sum(s.selective for s in hc.plan.segments),
                "verify": report.get("verify")}
    finally:
        hc.close()


def even_recomputed_odd_offloaded(site):
    if isinstance(site, RegionSite):
        return Action.RECOMPUTE if site.index % 2 == 0 else Action.OFFLOAD
    return None


class Saver(nn.Module):
    """y = lin(x), a DTensor sharded on its last dimension, saved by sin() and returned."""

    def __init__(self, mesh):
        super().__init__()
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        torch.manual_seed(0)
        self.lin = parallelize_module(nn.Linear(TP_WIDTH, 4 * TP_WIDTH), mesh, ColwiseParallel(use_local_output=False))

    def forward(self, x):
        y = self.lin(x)
        return y.sin(), y


def roundtrip_case(mesh, policy: str) -> dict:
    """What autograd unpacks for a saved DTensor (read twice through grad_fn._saved_self) is a
    DTensor equal to the one saved: mesh, placements, shape, stride, dtype and shard bytes."""
    from torch.distributed.tensor import DTensor
    saver = Saver(mesh)
    hc = HybridCheckpointer(saver, policy=policy, regions=[saver], keep_last=0, min_offload_bytes=0,
                            host_budget="64MiB")
    try:
        with hc:
            z, y = saver(torch.randn(BATCH * TP_SEQ, TP_WIDTH))
        reads = [z.grad_fn._saved_self for _ in range(2)]
        stats = stats_of(hc)
    finally:
        hc.close()
    return {"stats": stats, "reads": [{
        "type": type(r).__name__, "same_spec": isinstance(r, DTensor) and r._spec == y._spec,
        "mesh": isinstance(r, DTensor) and r.device_mesh == y.device_mesh,
        "placements": isinstance(r, DTensor) and r.placements == y.placements,
        "shape": r.shape == y.shape, "stride": r.stride() == y.stride(), "dtype": r.dtype == y.dtype,
        "shard_equal": isinstance(r, DTensor) and torch.equal(r._local_tensor, y._local_tensor),
        "shard_stride": isinstance(r, DTensor) and r._local_tensor.stride() == y._local_tensor.stride(),
    } for r in reads]}


def dedup_case(mesh) -> dict:
    """A DTensor and its transpose (one local storage) and the linear's input: two copies."""
    from offload import EmulatedBackend
    saver = Saver(mesh)
    x = torch.randn(BATCH * TP_SEQ, TP_WIDTH)

    def step(hc):
        with under(hc):
            _, y = saver(x)
            loss = y.sin().to_local().sum() + y.t().cos().to_local().sum()
        loss.backward()
        grads = [p.grad.to_local().clone() for p in saver.parameters()]
        saver.zero_grad(set_to_none=True)
        return grads, y._local_tensor.untyped_storage().nbytes()

    ref, _ = step(None)
    backend = EmulatedBackend()
    hc = HybridCheckpointer(policy="offload", regions=None, backend=backend, min_offload_bytes=0,
                            host_budget="64MiB")
    try:
        got, y_bytes = step(hc)
        return {"equal": all(torch.equal(a, b) for a, b in zip(ref, got)), "stats": stats_of(hc),
                "d2h": sum(kind == "d2h" for kind, _ in backend.order), "y_bytes": y_bytes,
                "x_bytes": x.untyped_storage().nbytes()}
    finally:
        hc.close()


def inplace_case(mesh, policy: str | None) -> dict:
    """A saved DTensor modified in place (a DTensor op) before backward: PyTorch raises, so
    must the runtime (policy None: plain PyTorch)."""
    saver = Saver(mesh)
    hc = None if policy is None else HybridCheckpointer(policy=policy, regions=None, min_offload_bytes=0,
                                                         host_budget="64MiB")
    try:
        with under(hc):
            z, y = saver(torch.randn(BATCH * TP_SEQ, TP_WIDTH))
            y.mul_(2)
        try:
            z.to_local().sum().backward()
        except Exception as e:
            return {"raised": type(e).__name__, "message": str(e)}
        return {"raised": None, "stats": None if hc is None else stats_of(hc)}
    finally:
        if hc is not None:
            hc.close()


def tp_cases(rank: int, world: int) -> dict:
    """The TP stacks (with and without sequence parallelism) under every policy, against the
    same stack trained plain; then a saved DTensor's round trip, dedup and in-place checks.
    The ranks of the TP group share their data and seeds (run(..., 0))."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for mode, sp in (("tp", False), ("tp-sp", True)):
        refs = {}

        def reference(backwards=1):
            model = tp_model(mesh, sp)
            refs[backwards] = run(model, model, None, 0, TP_STEPS, tp_batch, backwards)
            return {"losses": refs[backwards][0], "saved": saved_storages(model),
                    "param_type": type(model.blocks[0].up.weight).__name__}

        attempt(out, f"{mode}-reference", reference)
        if "error" in out[f"{mode}-reference"]:
            continue
        for policy in ("keep", "offload", "recompute"):
            attempt(out, f"{mode}-{policy}", lambda: tp_train(mesh, sp, policy, refs[1], rank))
        kept = out[f"{mode}-keep"].get("stats", {}).get("kept_bytes", 1 << 20)
        # Half of keep's bytes and no host memory to offload to: the plan replays blocks (their
        # collectives too), whatever the link and the timings
        attempt(out, f"{mode}-auto", lambda: tp_train(mesh, sp, "auto", refs[1], rank, device_budget=kept // 2,
                                                      host_budget=1))
        if not sp:
            continue
        # Budgets that differ between ranks, as device_budget="40%" of each GPU's free memory can:
        # alone, rank 0 would keep every block and rank 1 recompute them.
        uneven = 4 * kept if rank == 0 else kept // 2
        attempt(out, f"{mode}-auto-uneven", lambda: tp_train(mesh, sp, "auto", refs[1], rank, device_budget=uneven,
                                                            host_budget=1))
        attempt(out, f"{mode}-mixed-verify", lambda: tp_train(mesh, sp, even_recomputed_odd_offloaded, refs[1],
                                                             rank, verify="strict"))
        attempt(out, f"{mode}-reference-retain", lambda: reference(backwards=2))
        attempt(out, f"{mode}-recompute-retain", lambda: tp_train(mesh, sp, "recompute", refs[2], rank, backwards=2))
    for policy in ("keep", "offload", "recompute"):
        attempt(out, f"tp-roundtrip-{policy}", lambda: roundtrip_case(mesh, policy))
    attempt(out, "tp-dedup", lambda: dedup_case(mesh))
    for policy in (None, "keep", "offload"):
        attempt(out, f"tp-inplace-{policy or 'plain'}", lambda: inplace_case(mesh, policy))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="ddp,fsdp2")  # ddp, fsdp2, tp, pp, pp-1f1b
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
            cases = {"ddp": ddp_cases, "fsdp2": fsdp2_cases, "tp": tp_cases, "pp": pp_cases,
                     "pp-1f1b": lambda r, w: pp_cases(r, w, ("1f1b",))}
            result.update(cases[case](rank, world))
    finally:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(result, indent=1))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
