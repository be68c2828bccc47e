"""Layer 4c: autograd around and inside the runtime.

Region hooks act only for the forward's own thread (Rule 8). Each case is compared bitwise with a
plain run.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from offload import HybridCheckpointer
from offload.core.regions import RegionHooks

POLICIES = ["keep", "offload", "recompute"]


def runtime(model, policy, regions="auto", **kw) -> HybridCheckpointer:
    """Every tensor crosses the threshold and every region call may move (keep_last=0)."""
    return HybridCheckpointer(model, policy=policy, regions=regions, min_offload_bytes=0, keep_last=0,
                              host_budget="16MiB", **kw)


def grads_of(params, loss) -> list[torch.Tensor]:
    return [g.clone() for g in torch.autograd.grad(loss, params)]


def assert_equal_lists(ref, got) -> None:
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"tensor {i} differs"


# -- Rule 8: a plain call of a region on another thread ------------------------------------------
class Block(nn.Module):
    """A region. On the thread that built it, it calls `on_owner()` halfway through its forward; on
    any other thread, `hold()`."""

    def __init__(self, d=64):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.owner = threading.get_ident()
        self.on_owner = self.hold = None

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        mine = threading.get_ident() == self.owner
        if mine and self.on_owner is not None:
            self.on_owner()
        elif not mine and self.hold is not None:
            self.hold()
        return x + y


class Stack(nn.Module):
    """Three blocks; `between(when)` runs in the forward's gaps ("gap", "after") and inside block
    1's forward ("inside"), so a test can start another thread there."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.between = lambda when: None
        self.blocks[1].on_owner = lambda: self.between("inside")

    def forward(self, x):
        h = self.blocks[0](x)
        self.between("gap")
        h = h.sin() * h  # saved while the other thread may be inside a region call
        h = self.blocks[1](h)
        h = h.cos() * h  # saved after block 1 ended here, but not yet on the other thread
        self.between("after")
        return self.blocks[2](h).square().sum()


class OtherThread:
    """Calls `model.blocks[2]` plainly on another thread, paused inside its forward until the
    forward on the main thread has gone on; returns that call's input gradient."""

    def __init__(self, model: Stack, start: str, z: torch.Tensor):
        self.model, self.start_at, self.z = model, start, z
        self.inside, self.resume = threading.Event(), threading.Event()
        self.result: list = []
        self.thread = threading.Thread(target=self.run)

    def run(self):
        try:
            out = self.model.blocks[2](self.z)
            self.result.append(torch.autograd.grad(out.square().sum(), self.z)[0])
        except BaseException as e:  # surfaced by the test
            self.result.append(e)

    def hold(self):
        self.inside.set()
        assert self.resume.wait(30)

    def __call__(self, when: str):
        if when == self.start_at:
            self.model.blocks[2].hold = self.hold
            self.thread.start()
            assert self.inside.wait(30)
        elif when == "after" and self.thread.is_alive():
            self.resume.set()
            self.thread.join(30)


@pytest.mark.parametrize("start", ["gap", "inside"])
@pytest.mark.parametrize("policy", POLICIES)
def test_plain_region_call_on_another_thread_does_not_touch_the_forward(policy, start):
    """Rule 8: region hooks are per module; a call of a region on another thread while `with hc:`
    runs here must run plain, and the forward here must not see it."""
    torch.manual_seed(0)
    model = Stack()
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    z = torch.randn(32, 64, requires_grad=True)
    ref = grads_of(params + [x], model(x))
    ref_other = torch.autograd.grad(model.blocks[2](z).square().sum(), z)[0]

    hc = runtime(model, policy)
    for _ in range(3):
        other = OtherThread(model, start, z)
        model.between = other
        with hc:
            loss = model(x)
        model.between = lambda when: None
        model.blocks[2].hold = None
        assert_equal_lists(ref, grads_of(params + [x], loss))
        assert len(other.result) == 1 and torch.equal(other.result[0], ref_other)
        names = [s.name for s in hc.stats.segments.values() if s.name.startswith("blocks")]
        assert names == ["blocks.0", "blocks.1", "blocks.2"]
    if policy == "recompute":
        assert hc.stats.replays == 3


def test_backward_of_an_earlier_forward_on_another_thread_during_a_forward():
    """A replay on another thread (backward of step 1) while step 2's forward runs here."""
    torch.manual_seed(0)
    model = Stack()
    params = list(model.parameters())
    x1, x2 = torch.randn(32, 64), torch.randn(32, 64)
    ref1, ref2 = grads_of(params, model(x1)), grads_of(params, model(x2))
    hc = runtime(model, "recompute")
    with hc:
        loss1 = model(x1)
    result = []

    def backward_of_step_1(when):
        if when == "gap":
            t = threading.Thread(target=lambda: result.append(grads_of(params, loss1)))
            t.start()
            t.join(30)

    model.between = backward_of_step_1
    with hc:
        loss2 = model(x2)
    model.between = lambda when: None
    assert len(result) == 1
    assert_equal_lists(ref1, result[0])
    assert_equal_lists(ref2, grads_of(params, loss2))


def test_model_pre_hook_ignores_calls_on_other_threads():
    """The model's own pre-hook (policy="auto" reads the input signature there) follows Rule 8."""
    seen = []
    lin = nn.Linear(4, 4)
    hooks = RegionHooks([], enter=None, exit=None)
    hooks.add_pre_hook(lin, lambda args, kwargs: seen.append(tuple(args[0].shape)))
    other = threading.Thread(target=lambda: lin(torch.randn(2, 4)))
    other.start()
    other.join(30)
    lin(torch.randn(3, 4))
    hooks.remove()
    lin(torch.randn(5, 4))
    assert seen == [(3, 4)]
