"""Regression tests for faults found in review: each fails without its fix."""
import gc

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils._python_dispatch import _get_current_dispatch_mode

from offload import EmulatedBackend, HybridCheckpointer, OffloadError

from .conftest import MIN_OFFLOAD, TINY, assert_bitwise, settle, tiny_gpt, train, under

N = 256 * 256


def test_in_place_before_the_copy_finished_raises_even_if_the_tensor_died():
    """Rule 5 across the D2H: the copy may read data an in-place op already changed."""
    hc = HybridCheckpointer(policy="offload", regions=None, backend=EmulatedBackend(d2h_delay_s=0.2),
                            min_offload_bytes=1024, host_budget="16MiB")
    x = torch.randn(N, requires_grad=True)
    with hc:
        z = x * 2
        w = z.sin()  # saves z, whose copy is still waiting
    z.mul_(3)
    del z  # the user's reference is gone: only the runtime can still tell
    with pytest.raises(OffloadError, match="modified in place"):
        w.sum().backward()


def test_graphs_never_backpropagated_free_their_host_blocks():
    """A tensor saved by its own producer (exp) must not keep its graph alive through the handle."""
    hc = HybridCheckpointer(policy="offload", regions=None, min_offload_bytes=1024, host_budget="64MiB")
    x = torch.randn(N, requires_grad=True)
    for _ in range(3):
        with hc:
            y = (x * 2).sin()  # offloaded
            z = y[:100].exp()  # small: kept; exp saves its own output, which would hold exp's node
        assert hc.host_pool.in_use > 0
        del y, z
    settle(hc)
    assert hc.host_pool.in_use == 0


def test_selective_replay_keeps_random_draws_in_step():
    """Storing a random op's output would skip its RNG draw in the replay and shift later draws."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            a = torch.bernoulli(torch.full_like(x, 0.5))  # the policy would store this one...
            b = torch.rand_like(x)  # ...and not this one, which draws after it
            return (self.lin(x) * a + b).tanh()

    def save_first_draw(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.bernoulli.default else CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    model = nn.Sequential(Noisy(), Noisy())
    x = torch.randn(32, 64, requires_grad=True)

    def grads(hc):
        torch.manual_seed(1)
        with under(hc):
            loss = model(x).sum()
        torch.manual_seed(2)
        loss.backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    ref = grads(None)
    hc = HybridCheckpointer(model, policy="recompute", op_policy=save_first_draw, host_budget="16MiB")
    assert all(torch.equal(a, b) for a, b in zip(ref, grads(hc)))


def test_keyboard_interrupt_in_a_selective_region_leaves_no_dispatch_mode():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", op_policy=lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE,
                            host_budget="16MiB")
    hook = model.transformer.h[1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    from bench.gpt import make_batch
    idx, tgt = make_batch(TINY, 2)
    with pytest.raises(KeyboardInterrupt):
        with hc:
            model(idx, tgt)
    hook.remove()
    assert _get_current_dispatch_mode() is None
    ref = train(tiny_gpt(), None, steps=1)
    assert_bitwise(ref, train(model, hc, steps=1))


def test_auto_with_a_host_budget_too_small_to_probe():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="auto", device_budget=1 << 20, host_budget=1)
    ref = train(tiny_gpt(), None, steps=4)
    assert_bitwise(ref, train(model, hc, steps=4))
    assert hc.stats.offloaded_bytes == 0


def test_a_failed_forward_does_not_shrink_the_next_steps_offload():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="offload", min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB")
    train(model, hc, steps=1)
    normal = hc.stats.offloaded_bytes
    hook = model.transformer.h[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("block 1 failed")))
    from bench.gpt import make_batch
    idx, tgt = make_batch(TINY, 4)
    with pytest.raises(RuntimeError, match="block 1 failed"):
        with hc:
            model(idx, tgt)
    hook.remove()
    train(model, hc, steps=1)  # the failed forward's graph is gone: the retry is a step of its own
    assert hc.stats.forwards == 1 and hc.stats.offloaded_bytes == normal


class FailingCopies(EmulatedBackend):
    def d2h(self, src, dsts, label=""):
        raise RuntimeError("copy engine fault")


def test_a_failed_copy_returns_its_host_blocks():
    hc = HybridCheckpointer(policy="offload", regions=None, backend=FailingCopies(), min_offload_bytes=1024,
                            host_budget="16MiB")
    x = torch.randn(N, requires_grad=True)
    with pytest.raises(RuntimeError, match="copy engine fault"):
        with hc:
            (x * 2).sin()
    gc.collect()
    assert hc.host_pool.in_use == 0


def test_frozen_parameters_are_never_offloaded():
    head = nn.Linear(256, 256)
    head.requires_grad_(False)  # a frozen base (LoRA-style), not in any model the runtime was given
    hc = HybridCheckpointer(policy="offload", regions=None, min_offload_bytes=1024, host_budget="16MiB")
    x = torch.randn(64, 256, requires_grad=True)
    with hc:
        y = head(x * 1.0)  # with a frozen weight, only the weight (for dx) is saved
    assert hc.stats.offloaded_bytes == 0
    assert hc.stats.skipped_param_bytes == 256 * 256 * 4
    y.sum().backward()


def _matmul_then_in_place(x, w):
    h = x @ w
    h.add_(1)  # modifies the matmul's output after the op produced it
    return h.sin()


class InPlaceAfterMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        return _matmul_then_in_place(x, self.w)


@pytest.mark.parametrize("decision", ["MUST_SAVE", "MUST_CPU_OFFLOAD"])
def test_selective_store_ignores_outputs_modified_in_place(decision):
    """A stored op output that was modified in place must not be handed to the replay."""
    chosen = getattr(CheckpointPolicy, decision)

    def store_mm(ctx, op, *args, **kwargs):
        return chosen if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    model = nn.Sequential(InPlaceAfterMatmul(), InPlaceAfterMatmul())
    x = torch.randn(128, 64, requires_grad=True)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    hc = HybridCheckpointer(model, policy="recompute", op_policy=store_mm, min_offload_bytes=1024,
                            host_budget="16MiB")
    with hc:
        loss = model(x).sum()
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(ref, model.parameters()))


class SavedTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        (b,) = ctx.saved_tensors  # a second read in the same backward
        return g * 2 + 0 * (a + b)


class TwiceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return SavedTwice.apply(torch.tanh(self.lin(x)))


def test_reading_saved_tensors_twice_replays_once():
    model = nn.Sequential(*[TwiceBlock() for _ in range(3)])
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    x = torch.randn(32, 64, requires_grad=True)
    with hc:
        loss = model(x).sum()
    loss.backward()
    assert hc.stats.replays == 3


def test_pool_does_not_grow_for_a_request_it_cannot_hold():
    from offload.transfer.hostpool import MIN_SLAB, HostPool
    pool = HostPool(EmulatedBackend(), budget=3 * MIN_SLAB + MIN_SLAB // 2, slab_bytes=2 * MIN_SLAB)
    assert pool.alloc(3 * MIN_SLAB + MIN_SLAB // 4) is None  # only 2 + 1 MiB of slabs can exist
    assert pool.reserved == 0
    assert pool.alloc(3 * MIN_SLAB) is not None
