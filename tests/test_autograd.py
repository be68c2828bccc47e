"""Layer 4c: autograd around and inside the runtime.

Region hooks act only for the forward's own thread (Rule 8); a backward run inside a region's
forward (and so inside its replay) unpacks; double backward through a recomputed region; a saved
tensor that needs no grad comes back as the same object, as plain PyTorch gives it. Each case is
compared bitwise with a plain run and, where PyTorch has it, with torch.utils.checkpoint.
"""
from __future__ import annotations

import gc
import threading
import traceback
import weakref

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

from offload import Action, HybridCheckpointer, OffloadError, RegionSite
from offload.core import recompute
from offload.core.regions import RegionHooks

from .conftest import MIN_OFFLOAD, collector_off, make_backend, settle, under
from .test_recompute import RecomputeWithOffloadedInputs

POLICIES = ["keep", "offload", "recompute"]

# A replay's inputs attached to the graph before their region, their data kept or offloaded,
# need autograd's own saved variable (torch._C._autograd._make_saved_tensor); without it they
# come back detached, and a backward inside a replay cannot reach past its region.
needs_attached_inputs = pytest.mark.skipif(recompute._make_saved_tensor is None,
                                           reason="this PyTorch has no _make_saved_tensor")


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


def assert_steps_match(hc, model, x, ref, steps: int = 3) -> None:
    """`steps` forwards under `hc`: each step's gradients (parameters, then `x`) of the squared
    sum of the output equal `ref`."""
    params = list(model.parameters())
    for _ in range(steps):
        with hc:
            loss = model(x).square().sum()
        assert_equal_lists(ref, grads_of(params + [x], loss))


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


# -- a backward inside a region's forward, and inside its replay ---------------------------------
class GradBlock(nn.Module):
    """A region whose forward takes a gradient (create_graph=True) of its own computation."""

    def __init__(self, d=64):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        with torch.enable_grad():
            y = torch.tanh(self.lin(self.norm(x)))
            (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return x + y * g


def save_matmuls(ctx, op, *args, **kwargs):
    mm = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if op in mm else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
@pytest.mark.parametrize("policy", POLICIES)
def test_region_whose_forward_calls_autograd_grad(policy, selective):
    torch.manual_seed(0)
    model = nn.Sequential(GradBlock(), GradBlock(), GradBlock())
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    ref = grads_of(params + [x], model(x).square().sum())
    ckpt = grads_of(params + [x], checkpoint(model, x, use_reentrant=False).square().sum())
    assert_equal_lists(ref, ckpt)  # PyTorch supports it too
    hc = runtime(model, policy, op_policy=save_matmuls if selective else None)
    assert_steps_match(hc, model, x, ref)
    if policy == "recompute":
        # Each forward's inner grad reads its block's tensors while the block's forward runs: the
        # forward's own, as plain PyTorch reads them, with no replay. Backward replays each block once.
        assert hc.stats.replays == 3


def test_region_calling_autograd_grad_replays_from_offloaded_inputs():
    """The replay's inputs come back from host memory (after a delayed copy), attached to the
    graph before the region; the inner gradient is taken with respect to them."""
    torch.manual_seed(0)
    model = nn.Sequential(GradBlock(), GradBlock(), GradBlock())
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    ref = grads_of(params + [x], model(x).square().sum())
    hc = runtime(model, "recompute", backend=make_backend(torch.device("cpu"), 0.01), lookahead=0)
    hc._runtime.policy = RecomputeWithOffloadedInputs()
    assert_steps_match(hc, model, x, ref)
    assert hc.stats.offloaded_bytes > 0 and hc.stats.replays == 3
    settle(hc)
    assert hc.host_pool.in_use == 0 and hc.backend.poisoned == 0


class PenaltyBlock(nn.Module):
    """A region whose forward differentiates through the *previous* region (a gradient penalty
    w.r.t. the model input): that region is replayed while this one's forward is running."""

    def __init__(self, d=64):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)
        self.source = None

    def forward(self, h):
        a = self.lin(h)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(h.square().sum(), self.source, create_graph=True)
        return self.lin2(torch.tanh(a)) * g.mean() + h


class HalvedBlock(Block):
    """Its matmul's output is modified in place: a stored copy is not trusted, the replay runs
    the matmul again (and so passes it down to any selective forward still running)."""

    def forward(self, x):
        h = self.lin(x)
        h.mul_(0.5)
        return x + torch.tanh(h)


class PenaltyNet(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.blocks = nn.ModuleList([HalvedBlock(d), PenaltyBlock(d), Block(d)])
        self.ckpt = False  # each block under torch.utils.checkpoint instead

    def forward(self, x):
        self.blocks[1].source = x
        h = x
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.ckpt else block(h)
        return h.square().sum()


@needs_attached_inputs
@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_backward_inside_a_region_replays_an_earlier_region(selective):
    """Block 0's replay runs inside block 1's forward (its inner gradient goes through block 0),
    and again inside block 1's replay: the replay's inputs stay attached to the graph before the
    region, as torch.utils.checkpoint's do. Block 1's selective store must not take the replay's
    ops for its own: it stores what it stores when block 0 is kept and nothing replays."""
    torch.manual_seed(0)
    model = PenaltyNet()
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    ref = grads_of(params + [x], model(x))
    model.ckpt = True
    assert_equal_lists(ref, grads_of(params + [x], model(x)))  # PyTorch supports it too
    model.ckpt = False
    op_policy = save_matmuls if selective else None
    kept_bytes = {}
    for name, policy in (("all", "recompute"), ("block 0 kept", first_block_kept)):
        hc = runtime(model, policy, regions=list(model.blocks), op_policy=op_policy)
        for _ in range(3):
            with hc:
                loss = model(x)
            assert_equal_lists(ref, grads_of(params + [x], loss))
        kept_bytes[name] = next(s.kept for s in hc.stats.segments.values() if s.name == "blocks.1")
        if name == "all":  # block 0 inside block 1's forward, and inside each of its replays
            assert hc.stats.replays == 5
    assert kept_bytes["all"] == kept_bytes["block 0 kept"]


@needs_attached_inputs
@pytest.mark.parametrize("selective", [False, True], ids=["full", "selective"])
def test_backward_inside_a_region_reaches_past_offloaded_inputs(selective):
    """The same gradient penalty with every region's inputs offloaded (above the threshold, a
    delayed copy, several steps): the replay's inputs come from host memory yet stay attached
    to the graph before the region, so block 1's replay still differentiates through block 0 to
    the model input. Nothing of a step outlives it without gc, and the pool empties."""
    torch.manual_seed(0)
    model = PenaltyNet(d=128)
    params = list(model.parameters())
    x = torch.randn(64, 128, requires_grad=True)  # 32 KiB activations
    ref = grads_of(params + [x], model(x))
    hc = HybridCheckpointer(model, policy="recompute", regions=list(model.blocks), min_offload_bytes=MIN_OFFLOAD,
                            keep_last=0, host_budget="16MiB", lookahead=0,
                            backend=make_backend(torch.device("cpu"), 0.005),
                            op_policy=save_matmuls if selective else None)
    hc._runtime.policy = RecomputeWithOffloadedInputs()
    outputs: list = []
    _record_outputs(model, outputs)
    with collector_off():
        for step in range(3):
            with hc:
                loss = model(x)
            assert_equal_lists(ref, grads_of(params + [x], loss))
            del loss
            hc.backend.drain()
            assert outputs and all(s.expired() for s in outputs), \
                f"step {step}: {sum(not s.expired() for s in outputs)} of {len(outputs)} activations alive"
            outputs.clear()
    assert hc.stats.offloaded_bytes == 2 * 64 * 128 * 4  # blocks 1 and 2's inputs (x is a leaf: never moved)
    settle(hc)
    assert hc.host_pool.in_use == 0 and hc.backend.poisoned == 0


def first_block_kept(site):
    if isinstance(site, RegionSite):
        return Action.KEEP if site.index == 0 else Action.RECOMPUTE
    return None


# PyTorch's TestNestedCheckpoint (test/test_autograd.py) on our API: a region (c) around a function
# that may itself take gradients, inside or outside other gradients. Nested regions are part of
# the outer one here, so c(c(f)) is one region.
def _grad(fn):
    def wrapped(x):
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        return g
    return wrapped


class Fn(nn.Module):
    """A region whose forward is `fn`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _f(x, born):
    out = x.sin().exp().sin()
    born.append(weakref.ref(out))
    return out


def _g(x, born):
    """Takes two gradients it throws away, then returns something else (PyTorch's `g`)."""
    with torch.enable_grad():
        a = x.sin().exp().sin()
        b = x.sin().exp().sin()
        born.extend((weakref.ref(a), weakref.ref(b)))
        torch.autograd.grad(a.sum(), x)
        torch.autograd.grad(b.sum(), x)
    return x.sin()


NESTED = {  # name: (plain, with regions); "c" marks a region
    "c(f)": ("f", ["c", "f"]),
    "c(c(f))": ("f", ["c", "c", "f"]),
    "grad(c(f))": (["grad", "f"], ["grad", "c", "f"]),
    "grad(c(grad(f)))": (["grad", "grad", "f"], ["grad", "c", "grad", "f"]),
    "c(grad(grad(c(f))))": (["grad", "grad", "f"], ["c", "grad", "grad", "c", "f"]),
    "grad(c(grad(c(f))))": (["grad", "grad", "f"], ["grad", "c", "grad", "c", "f"]),
    "grad(c(grad(grad(c(f)))))": (["grad", "grad", "grad", "f"], ["grad", "c", "grad", "grad", "c", "f"]),
    "grad(c(grad(c(grad(c(f))))))": (["grad", "grad", "grad", "f"],
                                     ["grad", "c", "grad", "c", "grad", "c", "f"]),
}


def _build(spec, base, regions: list, ckpt: bool = False):
    if isinstance(spec, str):
        spec = [spec]
    fn = base
    for layer in reversed(spec[:-1]):
        if layer == "grad":
            fn = _grad(fn)
        elif ckpt:
            fn = (lambda inner: lambda x: checkpoint(inner, x, use_reentrant=False))(fn)
        else:
            regions.append(Fn(fn))
            fn = regions[-1]
    return fn


@pytest.mark.parametrize("base", ["f", "g"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(NESTED))
def test_nested_grad_and_regions_like_pytorch(name, policy, base):
    plain_spec, spec = NESTED[name]
    x = torch.randn(8, 8, requires_grad=True)
    born: list = []
    fn = (lambda t: _f(t, born)) if base == "f" else (lambda t: _g(t, born))
    ref_out = _build(plain_spec, fn, [])(x)
    ref = torch.autograd.grad(ref_out.sum(), x)[0]
    ckpt_out = _build(spec, fn, [], ckpt=True)(x)
    assert torch.equal(ref_out, ckpt_out) and torch.equal(ref, torch.autograd.grad(ckpt_out.sum(), x)[0])

    regions: list = []
    built = _build(spec, fn, regions)
    hc = runtime(nn.ModuleList(regions), policy, regions=regions)
    for _ in range(3):
        with hc:
            out = built(x)
        assert torch.equal(ref_out, out)
        assert torch.equal(ref, torch.autograd.grad(out.sum(), x)[0])
    # PyTorch's check_graph_dies: with the last reference to the output, everything goes.
    del out, ref_out, ckpt_out
    gc.collect()
    assert all(r() is None for r in born)


class Mlp(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.out(torch.tanh(self.fc(self.norm(x))))


def double_backward_grads(model, x, run) -> list[torch.Tensor]:
    """A gradient penalty: d/dparams (loss + |d loss / d x|^2), the loss's graph built by `run`."""
    params = list(model.parameters())
    loss = run().square().mean()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return grads_of(params, loss + gx.square().sum())


@pytest.mark.parametrize("policy", POLICIES)
def test_double_backward_through_recomputed_regions(policy):
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(), Mlp(), Mlp())
    x = torch.randn(32, 64, requires_grad=True)
    ref = double_backward_grads(model, x, lambda: model(x))
    ckpt = double_backward_grads(model, x, lambda: checkpoint(model, x, use_reentrant=False))
    assert_equal_lists(ref, ckpt)
    hc = runtime(model, policy)

    def ours():
        with hc:
            return model(x)

    for _ in range(3):
        assert_equal_lists(ref, double_backward_grads(model, x, ours))


@pytest.mark.parametrize("policy", POLICIES)
def test_retain_graph_after_a_forward_that_took_gradients(policy):
    """Rule 1 after an inner backward: a second backward through the same graph."""
    torch.manual_seed(0)
    model = nn.Sequential(GradBlock(), GradBlock())
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    loss = model(x).square().sum()
    ref = [g.clone() for g in torch.autograd.grad(loss, params, retain_graph=True)]
    hc = runtime(model, policy)
    with hc:
        loss = model(x).square().sum()
    first = [g.clone() for g in torch.autograd.grad(loss, params, retain_graph=True)]
    assert_equal_lists(ref, first)
    gc.collect()  # recomputed tensors of the first backward are gone: the second replays again
    assert_equal_lists(ref, grads_of(params, loss))
    if policy == "recompute":
        assert hc.stats.replays == 4  # each block once in each backward, none for its inner grad


def _record_outputs(model: nn.Module, into: list) -> None:
    """Note a weak reference to the storage of every output of every module."""
    for m in model.modules():
        m.register_forward_hook(lambda mod, args, out: into.append(StorageWeakRef(out.untyped_storage())))


@pytest.mark.parametrize("policy", POLICIES)
def test_nothing_of_a_step_outlives_it_without_gc(policy):
    """Every activation of a step, inner gradients and replays included, dies with its graph by
    reference counting alone (no cycle through autograd's C++ graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(GradBlock(), Mlp(), GradBlock())
    x = torch.randn(32, 64, requires_grad=True)
    outputs: list = []
    _record_outputs(model, outputs)
    hc = runtime(model, policy, regions=list(model))
    with collector_off():
        for _ in range(3):
            with hc:
                loss = model(x).square().sum()
            loss.backward()
            del loss
            hc.backend.drain()
            assert outputs and all(s.expired() for s in outputs), \
                f"{sum(not s.expired() for s in outputs)} of {len(outputs)} activations alive"
            outputs.clear()


class ScalesItsInput(nn.Module):
    """Modifies its own input in place after a layer saved it: plain PyTorch raises at backward."""

    def __init__(self, d=64):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        x.mul_(y)
        return x * 2


@pytest.mark.parametrize("policy", [None, "keep", "recompute"])
def test_region_modifying_its_input_in_place_raises_and_leaks_nothing(policy):
    """Rule 5 and Rule 9 together: we raise where PyTorch raises, and after the error nothing of
    the step stays alive (the modified input's history runs through the region's own nodes).
    Under offload the host copy holds the values as saved, so backward is right and need not
    raise; whether it does depends on when the copy was seen done (Rule 5 across the copy)."""
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(), ScalesItsInput(), Mlp())
    x = torch.randn(32, 64, requires_grad=True)
    outputs: list = []
    _record_outputs(model, outputs)
    hc = runtime(model, policy, regions=list(model)) if policy else None
    error, match = (RuntimeError, "modified by an inplace operation") if policy is None else \
        (OffloadError, "modified in place")
    with collector_off():
        for _ in range(3):
            with under(hc):
                loss = model(x).square().sum()
            with pytest.raises(error, match=match) as info:
                loss.backward()
            traceback.clear_frames(info.tb)  # the traceback's frames hold the graph otherwise
            del info, loss
        if policy is not None:  # plain PyTorch keeps one activation of each failed backward alive
            assert all(s.expired() for s in outputs), f"{sum(not s.expired() for s in outputs)} alive"


# -- identity of saved tensors that need no grad --------------------------------------------------
class SaveBoth(torch.autograd.Function):
    """Saves its input and a tensor that needs no grad (a mask); records what backward gets."""

    seen: list = []
    read_twice = True  # torch.utils.checkpoint refuses a second read; Rule 1 allows it

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(x, mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        x, mask = ctx.saved_tensors
        _, again = ctx.saved_tensors if SaveBoth.read_twice else (x, mask)
        SaveBoth.seen.append((mask, again))
        return grad * mask, None


class Masked(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, mask):
        return SaveBoth.apply(torch.tanh(self.lin(x)), mask)


class MaskedStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Masked() for _ in range(3))

    def forward(self, x, mask):
        for b in self.blocks:
            x = b(x, mask)
        return x.sum()


def _saved_mask_identity(run, mask) -> bool:
    SaveBoth.seen.clear()
    run()
    return len(SaveBoth.seen) == 3 and all(m is mask and a is mask for m, a in SaveBoth.seen)


@pytest.mark.parametrize("policy", POLICIES)
def test_saved_tensor_that_needs_no_grad_comes_back_as_itself(policy):
    """PyTorch's test_checkpointing_without_reentrant_saved_object_identity on our API: plain
    PyTorch and torch.utils.checkpoint hand back the very object saved; so do we."""
    torch.manual_seed(0)
    model = MaskedStack()
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    mask = (torch.rand(32, 64) > 0.5).float()
    assert _saved_mask_identity(lambda: model(x, mask).backward(), mask)
    SaveBoth.read_twice = False
    try:
        assert _saved_mask_identity(lambda: checkpoint(model, x, mask, use_reentrant=False).backward(), mask)
    finally:
        SaveBoth.read_twice = True
    ref = grads_of(params, model(x, mask))
    hc = runtime(model, policy, lookahead=0)
    for _ in range(3):
        with hc:
            loss = model(x, mask)
        got = []
        assert _saved_mask_identity(lambda: got.append(grads_of(params, loss)), mask)
        assert_equal_lists(ref, got[0])
    if policy == "offload":  # the caller's live mask was copied (once: one storage) and never reloaded
        assert hc.stats.h2d_bytes == hc.stats.offloaded_bytes - mask.numel() * 4


@pytest.mark.parametrize("policy", POLICIES)
def test_saved_tensor_that_needs_no_grad_and_died_comes_back_equal(policy):
    """When the caller dropped the saved object: kept, the handle holds it (the very object);
    recomputed, the frame holds it (a region input); offloaded, its device memory went, so it
    comes back from host memory, a new tensor with the same values, and a second read while
    the first lives gets that same tensor again, as plain PyTorch's second read does."""
    torch.manual_seed(0)
    model = MaskedStack()
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)

    def mask():
        return (torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    ref = grads_of(params, model(x, mask()))
    hc = runtime(model, policy)
    for _ in range(3):
        with hc:
            loss = model(x, mask())
        SaveBoth.seen.clear()
        assert_equal_lists(ref, grads_of(params, loss))
        assert len(SaveBoth.seen) == 3 and all(m is a for m, a in SaveBoth.seen)
        assert all(torch.equal(m, mask()) for m, _ in SaveBoth.seen)
    if policy == "offload":
        assert hc.stats.h2d_bytes == hc.stats.offloaded_bytes  # the dead mask came back from the host too


@pytest.mark.parametrize("policy", [None] + POLICIES)
def test_saved_tensor_that_needs_no_grad_modified_in_place_raises(policy):
    """Where plain PyTorch raises (a saved tensor modified in place), we raise too."""
    torch.manual_seed(0)
    model = MaskedStack()
    x = torch.randn(32, 64, requires_grad=True)
    mask = (torch.rand(32, 64) > 0.5).float()
    with under(runtime(model, policy) if policy else None):
        loss = model(x, mask)
    mask.mul_(2)
    if policy is None:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    else:
        with pytest.raises(OffloadError, match="modified in place"):
            loss.backward()


class MaskInside(nn.Module):
    """Draws a mask inside the region (needs no grad) and saves it with a custom Function;
    `keep_mask` holds the forward's mask on the module, as a caller holding it would."""

    def __init__(self, d=64):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.keep_mask = False
        self.masks: list = []

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        mask = (torch.rand_like(h) > 0.5).float()
        if self.keep_mask:
            self.masks.append(mask)
        return SaveBoth.apply(h, mask)


@pytest.mark.parametrize("held", [True, False], ids=["held", "dropped"])
@pytest.mark.parametrize("policy", POLICIES)
def test_mask_drawn_inside_a_region_comes_back_as_itself_while_it_lives(policy, held):
    """A mask drawn inside the region: while the forward's object lives (the module holds it) every
    policy gives that object back, as plain PyTorch does (torch.utils.checkpoint gives its
    recomputed one). Once dropped: kept, still itself (the handle holds it); offloaded or
    recomputed, a new tensor (from host memory, or the replay's), equal, and the same one on a
    second read. Several steps without reseeding: the RNG stream after backward is plain's."""
    torch.manual_seed(0)
    model = nn.Sequential(MaskInside(), MaskInside(), MaskInside())
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)

    def steps(hc):
        torch.manual_seed(1)
        out = []
        for _ in range(3):
            for b in model:
                b.keep_mask, b.masks = True, []
            with under(hc):
                loss = model(x).sum()
            values = [b.masks[0].clone() for b in model]
            forward_masks = [weakref.ref(b.masks[0]) for b in model]
            if not held:
                for b in model:
                    b.masks = []
            SaveBoth.seen.clear()
            grads = grads_of(params, loss)
            seen = list(reversed(SaveBoth.seen))  # backward runs the blocks last first
            SaveBoth.seen.clear()
            same = [m is f() for (m, _), f in zip(seen, forward_masks)]
            assert len(seen) == 3 and all(m is a for m, a in seen)  # the second read too
            assert all(torch.equal(m, v) for (m, _), v in zip(seen, values))
            out.append((grads, same, torch.rand(4)))
        return out

    ref = steps(None)
    assert all(all(same) for _, same, _ in ref)  # plain PyTorch: the very object, dropped or not
    got = steps(runtime(model, policy))
    for (ref_grads, _, ref_rng), (grads, same, rng) in zip(ref, got):
        assert_equal_lists(ref_grads, grads)
        assert torch.equal(ref_rng, rng)  # the replays left the caller's RNG stream alone
        assert all(same) if held or policy == "keep" else not any(same)


@needs_attached_inputs
@pytest.mark.parametrize("policy", POLICIES)
def test_inner_backward_in_a_forward_is_not_the_steps_backward(policy):
    """A backward inside a region's forward, through the region before it, does not open the
    step's backward: no backward entry on the timeline, no region-backward marks, and the next
    forward (gradient accumulation) joins the same step. Nor does one inside a replay: each
    region's backward is marked once per forward."""
    torch.manual_seed(0)
    model = PenaltyNet()
    x = torch.randn(32, 64, requires_grad=True)
    hc = runtime(model, policy, regions=list(model.blocks))
    with hc:
        loss1 = model(x)
    with hc:
        loss2 = model(x)
    timeline = hc.stats.timeline
    assert hc.stats.forwards == 2 and not hc._runtime.backward_seen
    assert timeline.backward == [] and timeline.region_backward == []
    (loss1 + loss2).backward()
    assert len(timeline.backward) == 1 and len(timeline.region_backward) == 6


@pytest.mark.parametrize("policy", POLICIES)
def test_backward_inside_with_hc_outside_regions_is_the_steps_backward(policy):
    """`loss.backward()` still inside `with hc:` (after the model returned) is the step's backward:
    timed, each region's backward marked, and the next forward starts the next step."""
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(), Mlp())
    x = torch.randn(32, 64, requires_grad=True)
    hc = runtime(model, policy)
    for step in (1, 2):
        with hc:
            loss = model(x).square().sum()
            loss.backward()
        timeline = hc.stats.timeline
        assert hc.stats.step == step and hc._runtime.backward_seen
        assert len(timeline.backward) == 1 and len(timeline.region_backward) == 2


class InplaceGradBlock(nn.Module):
    """Its first op modifies its input in place (ReLU(inplace=True)); then it takes a gradient
    with respect to that input inside its forward."""

    def __init__(self, d=64):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        x = self.act(x)
        with torch.enable_grad():
            y = torch.tanh(self.lin(x))
            (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return y * g + self.lin(g)


@pytest.mark.parametrize("policy", POLICIES)
def test_inner_grad_in_a_region_that_modifies_its_input_in_place(policy):
    """The replay runs on a copy of the inputs (the forward modifies them), attached to the graph
    before the region; the inner gradient is taken with respect to the copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), InplaceGradBlock(), nn.Linear(64, 64), InplaceGradBlock())
    params = list(model.parameters())
    x = torch.randn(32, 64, requires_grad=True)
    ref = grads_of(params + [x], model(x).square().sum())
    hc = runtime(model, policy, regions=[model[1], model[3]])
    assert_steps_match(hc, model, x, ref)
    if policy == "recompute":
        assert hc.stats.replays == 2


class DropGradBlock(nn.Module):
    """Dropout, then a gradient of its own output with respect to its input (create_graph)."""

    def __init__(self, d=128):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        with torch.enable_grad():
            y = self.drop(torch.tanh(self.lin(x)))
            (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return x + y * g


def mixed_regions(site):
    """Recompute even blocks, offload odd ones (their tensors and those between blocks)."""
    if isinstance(site, RegionSite):
        return Action.RECOMPUTE if site.index % 2 == 0 else Action.OFFLOAD
    return Action.OFFLOAD if site.region is None or site.region.index % 2 else None


@pytest.mark.parametrize("policy", POLICIES + ["mixed"])
def test_inner_grad_training_steps_bitwise_with_plain_and_torch_checkpoint(policy):
    """Four training steps of blocks that draw random numbers and take gradients in their forward,
    with activations above the offload threshold and a delayed copy, no reseeding between steps:
    each step's gradients and the RNG stream after each backward are plain PyTorch's, and those
    of torch.utils.checkpoint around each block."""
    torch.manual_seed(0)
    model = nn.Sequential(*(DropGradBlock() for _ in range(4)))
    params = list(model.parameters())
    x = torch.randn(64, 128, requires_grad=True)  # 32 KiB activations

    def train(forward):
        torch.manual_seed(1)
        out = []
        for _ in range(4):
            loss = forward().square().sum()
            out.append(grads_of(params + [x], loss) + [torch.rand(4)])
        return out

    def ckpt():
        h = x
        for block in model:
            h = checkpoint(block, h, use_reentrant=False)
        return h

    ref = train(lambda: model(x))
    for a, b in zip(ref, train(ckpt)):
        assert_equal_lists(a, b)
    hc = HybridCheckpointer(model, policy=mixed_regions if policy == "mixed" else policy, min_offload_bytes=MIN_OFFLOAD,
                            keep_last=0, host_budget="16MiB", backend=make_backend(torch.device("cpu"), 0.002))

    def ours():
        with hc:
            return model(x)

    for a, b in zip(ref, train(ours)):
        assert_equal_lists(a, b)
    if policy in ("offload", "mixed"):
        assert hc.stats.offloaded_bytes > 0 and hc.stats.h2d_bytes > 0
    if policy in ("recompute", "mixed"):
        assert hc.stats.replays == (4 if policy == "recompute" else 2)
    settle(hc)
    assert hc.host_pool.in_use == 0 and hc.backend.poisoned == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_region_input_modified_after_an_inner_backward_raises(policy):
    """Rule 5 with an inner backward: the forward's inner gradient read the input as it was; a
    change made to it after the forward must raise in backward, as plain PyTorch raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), GradBlock(), GradBlock())
    x = torch.randn(32, 64, requires_grad=True)
    for hc in (None, runtime(model, policy, regions=[model[1], model[2]])):
        with under(hc):
            h = model[0](x)
            loss = model[2](model[1](h)).square().sum()
        with torch.no_grad():
            h.mul_(2)
        error, match = (RuntimeError, "modified by an inplace operation") if hc is None else \
            (OffloadError, "modified in place")
        with pytest.raises(error, match=match):
            loss.backward()
