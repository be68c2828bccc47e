"""Layer 4b: recompute replays the forward exactly (Rule 7)."""
import pytest
import torch
from torch import nn

from offload import Action, HybridCheckpointer, OffloadError
from offload.core.policy import FixedPolicy
from scheduler.plan import SegmentPlan

from .conftest import MIN_OFFLOAD, make_backend, settle, under


class NoisyBlock(nn.Module):
    """Dropout, torch.randn and a data-independent RNG draw inside the region."""

    def __init__(self, d=256):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        noise = torch.randn_like(x)
        return x + self.drop(torch.tanh(self.lin(x) + noise))


class Stack(nn.Module):
    def __init__(self, n=3, d=256):
        super().__init__()
        self.blocks = nn.ModuleList(NoisyBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).sum()


def grads_of(model, hc, x, seed=11, autocast=None):
    torch.manual_seed(seed)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with under(hc), ctx:
        loss = model(x)
    torch.manual_seed(12345)  # reseeding between forward and backward must not change the replay
    torch.rand(100)
    loss.backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_rng_and_autocast_are_replayed(autocast):
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(64, 256)
    ref = grads_of(model, None, x, autocast=autocast)
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    for _ in range(3):
        got = grads_of(model, hc, x, autocast=autocast)
        assert torch.equal(ref[0], got[0])
        assert all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))
    assert hc.stats.replays == 3


def test_autocast_state_is_what_the_replay_uses():
    """Replaying without the recorded autocast state would save fp32 where forward saved bf16."""
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(64, 256)
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    with hc, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x)
    loss.backward()  # outside autocast: the replay must re-enter it itself
    assert hc.stats.replays == 3


def test_replay_that_saves_something_else_raises_clearly():
    class Shifty(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.wide = True

        def forward(self, x):
            y = self.lin(x)
            return y.sin() if self.wide else y[:, :32].sin().repeat(1, 2)

    model = nn.Sequential(Shifty(), Shifty())
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    x = torch.randn(8, 64)
    with hc:
        loss = model(x).sum()
    model[1].wide = False
    with pytest.raises(OffloadError, match=r"recompute of region 1 differs from its forward at saved tensor #\d+"):
        loss.backward()


def test_replay_stops_once_needed_tensors_exist():
    calls = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            y = self.lin(x).sin()
            calls.append("after-last-save")  # nothing below saves a tensor
            return y * 2

    model = nn.Sequential(Counted(), Counted())
    hc = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
    with hc:
        loss = model(torch.randn(8, 64)).sum()
    assert calls == ["after-last-save"] * 2
    loss.backward()
    assert calls == ["after-last-save"] * 2  # the replays stopped at sin's save


class RecomputeWithOffloadedInputs(FixedPolicy):
    def __init__(self):
        super().__init__(Action.RECOMPUTE)

    def region(self, site, segment):
        return SegmentPlan(Action.RECOMPUTE, offload_inputs=True)


def test_recompute_from_offloaded_inputs_waits_for_their_reload():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(256, 256)
    ref = grads_of(model, None, x)
    hc = HybridCheckpointer(model, policy="recompute", backend=make_backend(torch.device("cpu"), 0.02),
                            min_offload_bytes=MIN_OFFLOAD, host_budget="16MiB", lookahead=0)
    hc._runtime.policy = RecomputeWithOffloadedInputs()
    got = grads_of(model, hc, x)
    assert all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))
    s = hc.stats
    assert s.offloaded_bytes == 3 * 256 * 256 * 4  # each block's input, nothing else
    # lookahead=0: every reload on demand, but block 0's input is the caller's live `x`, which
    # needs no grad: it comes back as itself, as plain PyTorch gives it, with no reload to wait for.
    assert s.prefetch_misses == 2 and s.replays == 3
    settle(hc)
    assert hc.host_pool.in_use == 0 and hc.backend.poisoned == 0
