"""Layer 7: mixed precision, PyTorch's checkpoint policies, composition with torch.utils.checkpoint
and torch.compile."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from offload import HybridCheckpointer
from bench.gpt import make_batch

from .conftest import MIN_OFFLOAD, TINY, assert_bitwise, mixed, tiny_gpt, train, under

POLICIES = ["keep", "offload", "recompute", mixed]
IDS = ["keep", "offload", "recompute", "mixed"]
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def amp_train(model, hc, dtype, steps=3, scaler=None):
    out_losses, out_grads = [], []
    for s in range(steps):
        idx, tgt = make_batch(TINY, 4, seed=s)
        torch.manual_seed(50 + s)
        with torch.autocast("cpu", dtype=dtype), under(hc):
            _, loss = model(idx, tgt)
        torch.manual_seed(0)
        (scaler.scale(loss) if scaler else loss).backward()
        out_losses.append(loss.detach())
        out_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    return out_losses, out_grads


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-scaled"])
def test_cpu_autocast_gradients_equal(policy, dtype):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if dtype is torch.float16 else None
    ref = amp_train(tiny_gpt(), None, dtype, scaler=scaler)
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    assert_bitwise(ref, amp_train(model, hc, dtype, scaler=scaler))


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


def save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def offload_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_CPU_OFFLOAD if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def backward_matmuls(op_policy):
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", op_policy=op_policy, min_offload_bytes=MIN_OFFLOAD,
                            host_budget="64MiB")
    out = train(model, hc)
    idx, tgt = make_batch(TINY, 4)
    with hc:
        _, loss = model(idx, tgt)
    counter = CountMatmuls()
    with counter:
        loss.backward()
    return counter.count, out, hc


def test_selective_policy_replays_fewer_matmuls_with_equal_gradients():
    ref = train(tiny_gpt(), None)
    full, full_out, _ = backward_matmuls(None)
    saved, saved_out, hc = backward_matmuls(save_matmuls)
    moved, moved_out, hc_moved = backward_matmuls(offload_matmuls)
    for out in (full_out, saved_out, moved_out):
        assert_bitwise(ref, out)
    # 4 blocks x 6 forward matmuls (qkv, q@k, att@v, proj, fc, mlp proj) are not replayed
    assert full - saved == 24 and full - moved == 24, (full, saved, moved)
    assert hc.stats.kept_bytes > hc_moved.stats.kept_bytes  # saved outputs stay on the device...
    assert hc_moved.stats.offloaded_bytes > 0 and hc.stats.offloaded_bytes == 0  # ...or go to host


class Inner(nn.Module):
    """A block that checkpoints its own MLP with torch.utils.checkpoint."""

    def __init__(self, d=128, reentrant=False):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return x + checkpoint(self.mlp, h, use_reentrant=self.reentrant)


def grads(model, run):
    torch.manual_seed(0)
    loss = run()
    loss.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("policy", ["keep", "offload", "recompute"])
def test_user_checkpoint_inside_our_region(policy, reentrant):
    torch.manual_seed(0)
    model = nn.Sequential(*[Inner(reentrant=reentrant) for _ in range(3)])
    x = torch.randn(64, 128, requires_grad=True)
    ref = grads(model, lambda: model(x).square().sum())
    hc = HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")

    def ours():
        with hc:
            return model(x).square().sum()

    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(ref, grads(model, ours)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_our_context_inside_a_user_checkpoint(reentrant):
    torch.manual_seed(0)
    model = nn.Sequential(*[Inner() for _ in range(3)])
    x = torch.randn(64, 128, requires_grad=True)
    ref = grads(model, lambda: model(x).square().sum())
    hc = HybridCheckpointer(model, policy="offload", min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")

    def with_hc(inp):
        with hc:
            return model(inp)

    got = grads(model, lambda: checkpoint(with_hc, x, use_reentrant=reentrant).square().sum())
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["keep", "offload", "recompute"])
def test_compiled_region(policy):
    """A block compiled with torch.compile (aot_eager: AOTAutograd without codegen) is a region
    like any other: its saved tensors come through our hooks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_gpt()
    ref = train(tiny_gpt(), None, steps=2)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = torch.compile(block, backend="aot_eager")
    hc = HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    out = train(model, hc, steps=2)
    assert [r.name for r in hc.regions] == [f"transformer.h.{i}" for i in range(4)]
    # compiled graphs may fuse and round differently from eager: close, not bitwise
    torch.testing.assert_close(ref[0], out[0], rtol=0, atol=1e-5)
    for ga, gb in zip(ref[1], out[1]):
        compiled = {name.replace("._orig_mod", ""): g for name, g in gb.items()}
        assert compiled.keys() == ga.keys()
        for name, g in ga.items():
            torch.testing.assert_close(g, compiled[name], rtol=1e-4, atol=1e-5)
    if policy == "offload":
        assert hc.stats.offloaded_bytes > 0
    if policy == "recompute":
        assert hc.stats.replays == 4
