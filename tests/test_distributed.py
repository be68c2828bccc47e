"""torch.distributed on the CPU: 2 ranks with gloo, launched with torchrun (tests/dist/worker.py).

For keep / offload / recompute, each rank trains the embedded GPT (dropout 0.1, different data
per rank) under DDP and under FSDP2 (`fully_shard` per block and on the root, CPU device mesh),
once plain and once under `with hc:`, and the gradients after the all-reduce / reduce-scatter must
be bitwise equal. The default host budget is split among the ranks of one host (LOCAL_WORLD_SIZE).

Tensor parallelism (the same launch): a stack of attention-free blocks with column- and
row-parallel linears (`parallelize_module`), with and without sequence-parallel norms, saves
DTensor activations; under keep / offload / recompute / auto the local gradient shards must be
bitwise equal to the same stack trained plain, and the DTensors are moved by their local shard.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from offload import HybridCheckpointer

from .conftest import tiny_gpt

WORKER = Path(__file__).parent / "dist" / "worker.py"
ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
POLICIES = ["keep", "offload", "recompute"]
# Variables of an outer launcher that would confuse the inner torchrun.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def launch(out: Path, cases: str, world: int = WORLD) -> list[dict]:
    """Run the worker's `cases` on `world` ranks (torchrun --standalone picks a free port); the
    rank reports."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(WORKER), "--out", str(out), "--cases", cases]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after 300 s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    log = f"$ {' '.join(cmd)}\nexit {proc.returncode} after {time.monotonic() - t0:.1f} s\n" \
          f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-12000:]}"
    files = [out / f"rank{r}.json" for r in range(world)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(f"the distributed worker failed:\n{log}", pytrace=False)
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def ranks(two_ranks) -> list[dict]:
    """The DDP and FSDP2 cases (of the one 2-rank launch, tests/conftest.py two_ranks)."""
    return two_ranks


def case(ranks: list[dict], name: str) -> list[dict]:
    """The per-rank results of one case; a case that raised in a worker fails with its traceback."""
    results = []
    for r in ranks:
        assert name in r, f"rank {r['rank']} has no result for {name}"
        if "error" in r[name]:
            pytest.fail(f"rank {r['rank']}, case {name} raised in the worker:\n{r[name]['error']}", pytrace=False)
        results.append(r[name])
    return results


def test_ranks_ran_with_torchrun_environment(ranks):
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    assert all(r["world_size"] == WORLD and r["local_world_size"] == str(WORLD) for r in ranks)


def test_ddp_reference_is_distributed(ranks):
    """Sanity for the comparisons below: ranks see different data, and the all-reduce made their
    gradients identical."""
    ref = case(ranks, "ddp-reference")
    assert ref[0]["losses"] != ref[1]["losses"]
    assert all(r["grads_same_on_all_ranks"] for r in ref)


@pytest.mark.parametrize("target", ["inner", "wrapper"],
                         ids=["HybridCheckpointer(ddp.module)", "HybridCheckpointer(ddp)"])
@pytest.mark.parametrize("policy", POLICIES)
def test_ddp_gradients_bitwise_equal(ranks, target, policy):
    for rank, res in enumerate(case(ranks, f"ddp-{target}-{policy}")):
        assert res["bad"] == [], f"rank {rank}: {res['bad'][:10]}"
        prefix = "module." if target == "wrapper" else ""
        assert res["regions"] == [f"{prefix}transformer.h.{i}" for i in range(4)]
        s = res["stats"]
        assert s["skipped_param_bytes"] > 0
        if policy == "offload":
            assert s["offloaded_bytes"] > 0 and s["d2h_bytes"] == s["h2d_bytes"] > 0
        if policy == "recompute":
            assert s["recomputed_bytes"] > 0 and s["replays"] == 4
        if policy == "keep":
            assert s["offloaded_bytes"] == s["recomputed_bytes"] == 0


def test_fsdp2_runs_on_cpu_with_gloo(ranks):
    ref = case(ranks, "fsdp2-reference")
    assert all(r["param_type"] == "DTensor" for r in ref)  # the parameters really are sharded
    assert ref[0]["losses"] != ref[1]["losses"]


@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_gradients_bitwise_equal_and_parameters_never_moved(ranks, policy):
    for rank, res in enumerate(case(ranks, f"fsdp2-{policy}")):
        assert res["bad"] == [], f"rank {rank}: local gradient shards differ: {res['bad'][:10]}"
        s, single = res["stats"], res["single_process_stats"]
        # Parameters FSDP unshards for forward are recognised as parameters: the runtime moves and
        # keeps exactly what it does for the same model and batch without FSDP.
        for key in ("kept_bytes", "offloaded_bytes", "recomputed_bytes", "skipped_param_bytes"):
            assert s[key] == single[key], (key, s, single)
        assert s["skipped_param_bytes"] > 0
        if policy == "offload":
            assert s["offloaded_bytes"] > 0
        if policy == "recompute":
            assert s["recomputed_bytes"] > 0 and s["replays"] == 4


def test_report_after_ddp(ranks):
    for target in ("inner", "wrapper"):
        for policy in POLICIES:
            for rank, res in enumerate(case(ranks, f"ddp-{target}-{policy}")):
                assert "report_error" not in res, f"rank {rank}, {target}-{policy}:\n{res.get('report_error')}"
                assert res["report"]["offloaded_bytes"] == res["stats"]["offloaded_bytes"]
                assert res["report"]["param_bytes"] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_report_after_fsdp2(ranks, policy):
    for rank, res in enumerate(case(ranks, f"fsdp2-{policy}")):
        assert "report_error" not in res, f"rank {rank}:\n{res['report_error']}"
        assert res["report"]["offloaded_bytes"] == res["stats"]["offloaded_bytes"]


def test_default_host_budget_is_split_among_local_ranks(monkeypatch):
    model = tiny_gpt()

    def budget(local_world_size: str | None, **kw) -> int:
        if local_world_size is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
        hc = HybridCheckpointer(model, policy="offload", **kw)
        try:
            return hc.host_budget
        finally:
            hc.close()

    one, two, unset = budget("1"), budget("2"), budget(None)
    assert one > 0
    # Available host memory moves a little between calls on a shared machine: 5% tolerance.
    assert abs(two / one - 0.5) < 0.05 * 0.5, (one, two)
    assert abs(unset / one - 1) < 0.05, (one, unset)
    # An explicit budget is per process: it is not divided.
    assert budget("2", host_budget="64MiB") == 64 << 20


# -- tensor parallelism: DTensor activations -----------------------------------------------------------
TP_LAYERS = 4  # the worker's TP stack: blocks of norm, column-parallel up, GELU, row-parallel down, dropout
TP_MIN_OFFLOAD = 16 * 1024  # the worker's min_offload_bytes
TP_MODES = ["tp", "tp-sp"]


@pytest.fixture(scope="module")
def tp_ranks(two_ranks) -> list[dict]:
    """The tensor-parallel cases (tests/dist/worker.py tp_cases), of the one 2-rank launch."""
    return two_ranks


def test_tp_stacks_save_dtensor_activations(tp_ranks):
    """Sanity for the comparisons below: the sharded stacks save DTensor activations big enough
    to move (with sequence parallelism, the residual stream too)."""
    for mode in TP_MODES:
        for ref in case(tp_ranks, f"{mode}-reference"):
            assert ref["param_type"] == "DTensor"
            moved = [e for e in ref["saved"]["storages"] if e["dtensor"] and not e["param"]
                     and e["nbytes"] >= TP_MIN_OFFLOAD]
            assert len(moved) >= (4 if mode == "tp-sp" else 2) * TP_LAYERS, moved


@pytest.mark.parametrize("mode", TP_MODES)
@pytest.mark.parametrize("policy", ["keep", "offload", "recompute", "auto"])
def test_tp_gradients_bitwise_equal_and_dtensors_moved_by_their_shard(tp_ranks, mode, policy):
    refs = case(tp_ranks, f"{mode}-reference")
    results = case(tp_ranks, f"{mode}-{policy}")
    for rank, (ref, res) in enumerate(zip(refs, results)):
        assert res["bad"] == [], f"rank {rank}: local gradient shards differ: {res['bad'][:10]}"
        s, saved = res["stats"], ref["saved"]["storages"]
        # Every distinct storage is counted once, a DTensor by its local shard's bytes (not its
        # global size), under one action; parameters' shards are recognised and never moved. A
        # selective block (auto at op level) also keeps op outputs autograd itself never saves.
        counted = s["kept_bytes"] + s["offloaded_bytes"] + s["recomputed_bytes"] + s["skipped_param_bytes"]
        if res.get("selective"):
            assert counted >= sum(e["nbytes"] for e in saved)
        else:
            assert counted == sum(e["nbytes"] for e in saved)
        assert s["skipped_param_bytes"] == sum(e["nbytes"] for e in saved if e["param"])
        if policy == "keep":
            assert s["offloaded_bytes"] == s["recomputed_bytes"] == 0
        if policy == "offload":  # all that crosses the threshold before the resident last block
            movable = [e for e in saved if not e["param"] and e["nbytes"] >= TP_MIN_OFFLOAD
                       and e["block"] < TP_LAYERS - 1]
            assert any(e["dtensor"] for e in movable)
            assert s["offloaded_bytes"] == s["d2h_bytes"] == s["h2d_bytes"] == sum(e["nbytes"] for e in movable)
        if policy == "recompute":  # all the blocks save but their inputs, kept to replay them
            in_blocks = sum(e["nbytes"] for e in saved if not e["param"] and 0 <= e["block"] < TP_LAYERS
                            and e["block"] == int(e["block"]))
            assert s["replays"] == TP_LAYERS
            assert s["recomputed_bytes"] == in_blocks - sum(ref["saved"]["block_inputs"])
        if policy == "auto":
            assert res["plan"] is not None and "recompute" in res["plan"]
    if policy == "auto":
        assert results[0]["plan"] == results[1]["plan"]


def test_tp_auto_ranks_with_different_budgets_run_one_plan(tp_ranks):
    """Alone, rank 0 (a budget 4x what keeping needs) would keep every block and rank 1 (half of
    it, no host memory) recompute them: a replay's collectives on one rank would then meet other
    collectives on the other (a hang). The ranks plan under the smaller budget and run one plan."""
    results = case(tp_ranks, "tp-sp-auto-uneven")
    for rank, res in enumerate(results):
        assert res["bad"] == [], f"rank {rank}: {res['bad'][:10]}"
        assert "recompute" in res["plan"]
        assert res["stats"]["replays"] == res["plan"].count("recompute")
    assert results[0]["plan"] == results[1]["plan"]


def test_tp_mixed_policy_reloads_and_replays_equal_what_was_saved(tp_ranks):
    """Even blocks recomputed, odd ones offloaded, verify="strict": every reloaded or
    recomputed DTensor equals the one saved, and the gradients are bitwise equal."""
    for rank, res in enumerate(case(tp_ranks, "tp-sp-mixed-verify")):
        assert res["bad"] == [], f"rank {rank}: {res['bad'][:10]}"
        v, s = res["verify"], res["stats"]
        assert v["compared"] > 0 and v["mismatches"] == 0 and v["max_abs_diff"] == 0.0
        assert s["replays"] == TP_LAYERS // 2 and s["offloaded_bytes"] > 0 and s["recomputed_bytes"] > 0


def test_tp_recompute_with_retain_graph(tp_ranks):
    """Two backward passes through one recomputed graph: the second replays again, the same."""
    for rank, res in enumerate(case(tp_ranks, "tp-sp-recompute-retain")):
        assert res["bad"] == [], f"rank {rank}: {res['bad'][:10]}"
        assert res["stats"]["replays"] == 2 * TP_LAYERS


@pytest.mark.parametrize("policy", ["keep", "offload", "recompute"])
def test_tp_unpacked_dtensor_equals_the_saved_one(tp_ranks, policy):
    for res in case(tp_ranks, f"tp-roundtrip-{policy}"):
        for read in res["reads"]:  # read twice: unpack is repeatable (Rule 1)
            assert read == {"type": "DTensor", "same_spec": True, "mesh": True, "placements": True,
                            "shape": True, "stride": True, "dtype": True, "shard_equal": True,
                            "shard_stride": True}
        s = res["stats"]
        if policy == "offload":
            assert s["offloaded_bytes"] > 0 and s["kept_bytes"] == 0
        if policy == "recompute":  # the second read finds the first one's shard alive
            assert s["replays"] == 1 and s["recomputed_bytes"] > 0


def test_tp_dtensor_and_its_transpose_are_copied_once(tp_ranks):
    """Rule 4 on the local shard: y and y.t() (two DTensors, one shard storage) and the
    linear's input give two copies, of exactly their shard bytes."""
    for res in case(tp_ranks, "tp-dedup"):
        assert res["equal"]
        assert res["d2h"] == 2
        assert res["stats"]["d2h_bytes"] == res["stats"]["offloaded_bytes"] == res["x_bytes"] + res["y_bytes"]


def test_tp_in_place_change_of_a_saved_dtensor_raises(tp_ranks):
    """Rule 5 on the DTensor's own version counter: where PyTorch raises, so does the runtime."""
    for res in case(tp_ranks, "tp-inplace-plain"):
        assert res["raised"] == "RuntimeError" and "modified by an inplace operation" in res["message"]
    for policy in ("keep", "offload"):
        for res in case(tp_ranks, f"tp-inplace-{policy}"):
            assert res["raised"] == "OffloadError", res
            assert "modified in place" in res["message"] and "clone" in res["message"].lower()
