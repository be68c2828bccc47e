"""Layer 4d: selective recompute (`op_policy`) against PyTorch's own selective checkpointing."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

from offload import HybridCheckpointer

from .conftest import settle

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class Fn(nn.Module):
    """A region whose forward is `fn`, with one parameter it may use."""

    def __init__(self, fn, d=64):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return self.fn(x, self.w)


def busy_fn(x, w):
    """Matmuls, a view, an in-place op, a random op and a multi-output op."""
    h = torch.matmul(x, w).view(-1, w.shape[0])
    h = torch.nn.functional.dropout(torch.tanh(h), 0.2, training=True)
    h.mul_(2)
    var, mean = torch.var_mean(h, dim=0)
    return torch.matmul(h, w).sin() * var + mean


def _has_op_output() -> bool:
    return hasattr(SelectiveCheckpointContext(is_recompute=False), "op_output")


@pytest.mark.skipif(not _has_op_output(), reason="this PyTorch does not pass op outputs to policies")
@pytest.mark.parametrize("gc_on", [True, False], ids=["gc", "no-gc"])
@pytest.mark.parametrize("decision", ["MUST_SAVE", "MUST_CPU_OFFLOAD"])
def test_stored_op_outputs_die_with_their_step(decision, gc_on):
    """Nothing a step stored may outlive its backward, with or without the cycle collector: a
    stored output handed to the replay must not end up holding the replay's graph (whose hooks
    hold the store that holds it)."""
    chosen = getattr(CheckpointPolicy, decision)
    stored: list[StorageWeakRef] = []

    def policy(ctx, op, *args, **kwargs):
        if op in MATMULS:
            stored.append(StorageWeakRef(ctx.op_output.untyped_storage()))
            return chosen
        return CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    model = nn.Sequential(Fn(busy_fn), Fn(busy_fn), Fn(busy_fn))
    x = torch.randn(64, 64, requires_grad=True)
    hc = HybridCheckpointer(model, policy="recompute", op_policy=policy, min_offload_bytes=0, keep_last=0,
                            host_budget="16MiB")
    was_enabled = gc.isenabled()
    if not gc_on:
        gc.disable()
    try:
        for _ in range(3):
            with hc:
                loss = model(x).sum()
            loss.backward()
            del loss
            hc.backend.drain()
            if gc_on:
                gc.collect()
            assert len(stored) == 6
            assert all(s.expired() for s in stored), f"{sum(not s.expired() for s in stored)} of 6 alive"
            stored.clear()
    finally:
        if was_enabled:
            gc.enable()
    if decision == "MUST_CPU_OFFLOAD":
        assert hc.stats.offloaded_bytes > 0
    settle(hc)
    assert hc.host_pool.in_use == 0
