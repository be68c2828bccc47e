"""Layer 4c: the replay reads what the forward read, runs the module the way it was called, and
leaves module state as one plain forward leaves it (Rules 5 and 7)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from offload import Action, EmulatedBackend, HybridCheckpointer, OffloadError, RegionSite

from bench.gpt import make_batch

from .conftest import MIN_OFFLOAD, TINY, tiny_gpt, under

D = 128  # features: a (64, 128) float32 activation is 32 KiB, above MIN_OFFLOAD
BATCH = 64


def every_other(site):
    """Recompute even region calls, offload odd ones; tensors follow their region."""
    if isinstance(site, RegionSite):
        return Action.RECOMPUTE if site.index % 2 == 0 else Action.OFFLOAD
    return None


POLICIES = ["recompute", every_other, "auto"]
IDS = ["recompute", "every-other", "auto"]
# The tests that need a replay: "auto" replays nothing on this stack, where replaying a block
# holds its inputs, its bytes and its backward's working set at once, more than keeping it
# (Shifted blocks: 361 vs 263 KiB planned), so its plans keep or offload.
REPLAYING, REPLAYING_IDS = POLICIES[:2], IDS[:2]


def checkpointer(model, policy, **kw) -> HybridCheckpointer:
    kw.setdefault("host_budget", "64MiB")
    kw.setdefault("min_offload_bytes", MIN_OFFLOAD)
    if policy == "auto":
        kw.setdefault("device_budget", 256 * 1024)  # tight: the plan recomputes or offloads blocks
        kw.setdefault("backend", EmulatedBackend())
    return HybridCheckpointer(model, policy=policy, **kw)


class Stack(nn.Module):
    """An input projection, `n` blocks (the regions, `model.blocks`), a scalar loss."""

    def __init__(self, make_block, n: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList(make_block() for _ in range(n))
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h).square().mean()


def run(model, hc, steps: int = 4, seed: int = 0):
    """`steps` steps (forward, backward, SGD step); per step the loss, the gradients and every
    buffer after the step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for s in range(steps):
        x = torch.randn(BATCH, D, generator=g)
        torch.manual_seed(100 + s)
        with under(hc):
            loss = model(x)
        loss.backward()
        out.append((loss.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()},
                    {n: b.clone() for n, b in model.named_buffers()}))
        opt.step()
        model.zero_grad(set_to_none=True)
    return out


def assert_same(ref, got) -> None:
    """Losses, gradients and buffers bitwise equal, step by step."""
    assert len(ref) == len(got)
    for s, ((la, ga, ba), (lb, gb, bb)) in enumerate(zip(ref, got)):
        assert torch.equal(la, lb), f"step {s}: loss {la.item()} != {lb.item()}"
        assert ga.keys() == gb.keys() and ba.keys() == bb.keys()
        for name in ga:
            assert torch.equal(ga[name], gb[name]), f"step {s}: gradient of {name} differs"
        for name in ba:
            assert torch.equal(ba[name], bb[name]), f"step {s}: buffer {name} differs ({ba[name]} vs {bb[name]})"


# -- Rule 5: the state a replay reads is the state the forward read -------------------------------

class Shifted(nn.Module):
    """Adds a parameter, a buffer and a plain tensor attribute: an add saves neither operand, so
    only the replay reads them again."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.shift = nn.Parameter(torch.randn(D) * 0.1)
        self.register_buffer("offset", torch.randn(D) * 0.1)
        self.scale = torch.full((D,), 0.5)  # a tensor attribute: neither parameter nor buffer

    def forward(self, x):
        return torch.tanh(self.lin(x) + self.shift + self.offset + self.scale)


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
@pytest.mark.parametrize("name", ["shift", "offset", "scale", "lin.weight"])
def test_state_modified_in_place_before_the_replay_raises(policy, name):
    """Plain PyTorch uses the values it saved here (or raises for lin.weight, which addmm saves);
    a replay would silently read the new ones."""
    model = Stack(Shifted)
    hc = checkpointer(model, policy)
    with hc:
        loss = model(torch.randn(BATCH, D))
    with torch.no_grad():
        owner, attr = (model.blocks[0].lin, "weight") if name == "lin.weight" else (model.blocks[0], name)
        getattr(owner, attr).add_(1)
    with pytest.raises(OffloadError, match=rf"blocks\.0\.{name}.*modified in place"):
        loss.backward()


@pytest.mark.parametrize("policy", REPLAYING, ids=REPLAYING_IDS)
def test_state_updated_between_steps_is_not_a_change(policy):
    """The optimizer and the user update parameters, buffers and attributes in place between
    steps (after backward, before the next forward): no false alarm, gradients bitwise."""

    def update(model):
        with torch.no_grad():
            for b in model.blocks:
                b.offset.mul_(0.5)
                b.scale.add_(0.25)

    ref_model, model = Stack(Shifted), Stack(Shifted)
    ref, got = [], []
    hc = checkpointer(model, policy)
    for s in range(4):
        ref += run(ref_model, None, steps=1, seed=s)
        got += run(model, hc, steps=1, seed=s)
        update(ref_model)
        update(model)
    assert_same(ref, got)
    assert hc.stats.replays > 0


def test_state_assigned_anew_is_still_watched():
    """Where a module's state lives is learned once; a tensor assigned there later is read, and
    watched, from there."""
    model = Stack(Shifted)
    hc = checkpointer(model, "recompute")
    run(model, hc, steps=1)
    for b in model.blocks:
        b.scale = b.scale * 0.5  # a new tensor attribute
        b.offset = b.offset * 0.5  # a new buffer (nn.Module puts it in _buffers)
    with hc:
        loss = model(torch.randn(BATCH, D))
    with torch.no_grad():
        model.blocks[1].scale.add_(1)
    with pytest.raises(OffloadError, match=r"blocks\.1\.scale.*modified in place"):
        loss.backward()


def test_saved_tensor_changed_after_the_forward_and_before_a_second_backward_raises():
    """retain_graph=True, then an optimizer step: plain PyTorch raises on the saved weight; the
    replay must not run on the updated parameters either."""
    model = Stack(Shifted)
    hc = checkpointer(model, "recompute")
    with hc:
        loss = model(torch.randn(BATCH, D))
    loss.backward(retain_graph=True)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(OffloadError, match="modified in place"):
        loss.backward()


@pytest.mark.parametrize("policy", ["keep", "offload", "recompute"])
def test_region_input_modified_in_place_after_the_forward_raises(policy):
    """The region's input is saved (by its first linear) or held for the replay: both see it."""
    model = Stack(Shifted)
    hc = checkpointer(model, policy, keep_last=0)
    h = model.inp(torch.randn(BATCH, D))
    with hc:
        out = model.blocks[0](h)
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(OffloadError, match="modified in place"):
        out.sum().backward()


class TanhOut(nn.Module):
    """tanh saves its own output: the block's output is a saved tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class ScalesAfterSave(nn.Module):
    """Modifies a tensor in place after sin saved it; the tensor dies inside the block."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        out = h.sin()
        h.mul_(2)
        return out + h


def delayed(policy):
    """A checkpointer whose copies are slow enough that an in-place op always beats the D2H."""
    return lambda model: HybridCheckpointer(model, policy=policy, host_budget="64MiB",
                                            min_offload_bytes=MIN_OFFLOAD, keep_last=0,
                                            backend=EmulatedBackend(d2h_delay_s=0.2))


@pytest.mark.parametrize("make", [delayed("keep"), delayed("offload"), delayed("recompute")],
                         ids=["keep", "offload", "recompute"])
def test_saved_output_modified_in_place_after_the_forward_raises(make):
    model = nn.Sequential(TanhOut(), TanhOut())
    x = torch.randn(BATCH, D, requires_grad=True)
    y = model(x)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()  # plain PyTorch
    hc = make(model)
    with hc:
        y = model(x)
    y.mul_(2)
    with pytest.raises(OffloadError, match=r"saved in 1 was modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("make", [delayed("keep"), delayed("offload"), delayed("recompute")],
                         ids=["keep", "offload", "recompute"])
def test_saved_tensor_modified_in_place_inside_its_region_raises(make):
    model = nn.Sequential(ScalesAfterSave(), ScalesAfterSave())
    x = torch.randn(BATCH, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # plain PyTorch
    hc = make(model)
    with hc:
        loss = model(x).sum()
    with pytest.raises(OffloadError, match="modified in place"):
        loss.backward()


# -- Rule 7: state the forward modifies ends as one plain forward leaves it -----------------------

class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, x):
        return torch.relu(self.bn(self.lin(x)))


class Counted(nn.Module):
    """Reads a buffer after modifying it: a replay from the updated count would compute other
    values with the same shapes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return torch.sin(self.lin(x) * (1 + 0.25 * self.calls))


class SpectralNormed(nn.Module):
    """Spectral norm's parametrization runs a power iteration on its buffers (_u, _v) in place on
    every training forward, and the weight it returns depends on them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.utils.parametrizations.spectral_norm(nn.Linear(D, D))

    def forward(self, x):
        return torch.tanh(self.lin(x))


BLOCKS = [Normed, Counted, SpectralNormed]


@pytest.mark.parametrize("policy", REPLAYING, ids=REPLAYING_IDS)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_state_the_forward_modifies_ends_as_after_a_plain_step(policy, block):
    ref = run(Stack(block), None)
    model = Stack(block)
    hc = checkpointer(model, policy)
    assert_same(ref, run(model, hc))
    assert hc.stats.replays > 0


def test_second_backward_replays_again_and_leaves_the_state_alone():
    """retain_graph=True: the second backward replays every block again (Rule 1), and restores
    the statistics again."""

    def twice(model, hc):
        torch.manual_seed(0)
        with under(hc):
            loss = model(torch.randn(BATCH, D))
        loss.backward(retain_graph=True)
        loss.backward()
        return [(loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                 {n: b.clone() for n, b in model.named_buffers()})]

    ref = twice(Stack(Normed), None)
    model = Stack(Normed)
    hc = checkpointer(model, "recompute")
    assert_same(ref, twice(model, hc))
    assert hc.stats.replays == 8


def test_forward_that_fails_inside_a_block_then_training_goes_on():
    """Rule 9: a forward that raises after BatchNorm updated its statistics leaves them as plain
    PyTorch does, and teaches the runtime nothing that breaks the next steps."""

    class Failing(Normed):
        fail = False

        def forward(self, x):
            out = super().forward(x)
            if self.fail:
                raise KeyError("boom")
            return out

    def with_failure(model, hc):
        out = run(model, hc, steps=1, seed=0)
        model.blocks[2].fail = True
        with pytest.raises(KeyError):
            with under(hc):
                model(torch.randn(BATCH, D))
        model.blocks[2].fail = False
        return out + run(model, hc, steps=3, seed=1)

    ref = with_failure(Stack(Failing), None)
    model = Stack(Failing)
    hc = checkpointer(model, "recompute")
    assert_same(ref, with_failure(model, hc))


def test_torch_checkpoint_counts_batchnorm_twice():
    """What the test above guards against: torch.utils.checkpoint replays BatchNorm's update."""

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Normed()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    plain, theirs = Stack(Normed), Stack(Checkpointed)
    run(plain, None, steps=1)
    run(theirs, None, steps=1)
    assert plain.blocks[0].bn.num_batches_tracked.item() == 1
    assert theirs.blocks[0].inner.bn.num_batches_tracked.item() == 2
    assert not torch.equal(plain.blocks[0].bn.running_mean, theirs.blocks[0].inner.bn.running_mean)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_several_forwards_before_one_backward(block):
    """Gradient accumulation: each replay reads the state its own forward read."""

    def accumulate(model, hc):
        g = torch.Generator().manual_seed(3)
        out = []
        for step in range(3):
            losses = []
            for micro in range(3):
                torch.manual_seed(10 * step + micro)
                with under(hc):
                    losses.append(model(torch.randn(BATCH, D, generator=g)))
            sum(losses).backward()
            out.append((sum(losses).detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
            model.zero_grad(set_to_none=True)
        return out

    ref = accumulate(Stack(block), None)
    model = Stack(block)
    hc = checkpointer(model, "recompute")
    assert_same(ref, accumulate(model, hc))
    assert hc.stats.replays == 12


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_one_block_called_twice_per_forward(block):
    """Weight sharing: the same region module runs twice in one forward, updating its state twice."""

    class Shared(Stack):
        def forward(self, x):
            h = self.inp(x)
            for b in (self.blocks[0], self.blocks[1], self.blocks[0], self.blocks[1]):
                h = b(h)
            return self.head(h).square().mean()

    ref = run(Shared(block, n=2), None)
    model = Shared(block, n=2)
    hc = checkpointer(model, "recompute")
    assert_same(ref, run(model, hc))
    assert hc.stats.replays == 4


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_eval_steps_then_training_steps(policy):
    """Fine-tuning with frozen statistics, then training: habits are learned per training mode,
    and what eval mode taught (BatchNorm reads its statistics, modifies nothing) does not hide
    what training mode modifies."""

    def mixed_modes(model, hc):
        out = []
        for s, training in enumerate([False, False, True, True, False, True]):
            model.train(training)
            out += run(model, hc, steps=1, seed=s)
        return out

    ref = mixed_modes(Stack(Normed), None)
    model = Stack(Normed)
    hc = checkpointer(model, policy)
    assert_same(ref, mixed_modes(model, hc))


def test_replay_that_fails_leaves_the_state_as_the_forward_left_it():
    """Rule 9: a replay that raises still restores what it snapshotted."""
    model = Stack(Normed)
    hc = checkpointer(model, "recompute")
    run(model, hc, steps=1)
    with hc:
        loss = model(torch.randn(BATCH, D))
    after_forward = {n: b.clone() for n, b in model.named_buffers()}
    lin = model.blocks[2].lin
    lin.forward = lambda x: nn.functional.linear(x[:, : D // 2].repeat(1, 2), lin.weight)  # saves other shapes
    with pytest.raises(OffloadError, match="differs from its forward"):
        loss.backward()
    for n, b in model.named_buffers():
        assert torch.equal(b, after_forward[n]), n


# -- a region whose first op is in place on its input --------------------------------------------

class Double(nn.Module):
    def forward(self, x):
        return x.mul_(2)


class Sine(nn.Module):
    def forward(self, x):
        return x.sin_()


FIRST_OPS = {"relu": lambda: nn.ReLU(inplace=True), "mul": Double, "sin": Sine}


@pytest.mark.parametrize("policy", REPLAYING, ids=REPLAYING_IDS)
@pytest.mark.parametrize("first", FIRST_OPS, ids=list(FIRST_OPS))
def test_region_modifying_its_input_in_place(policy, first):
    """Plain PyTorch trains this; torch.utils.checkpoint raises (checked below); recompute must
    replay from the input as it was before the region modified it."""
    make = lambda: nn.Sequential(FIRST_OPS[first](), nn.Linear(D, D))  # noqa: E731
    ref = run(Stack(make), None)
    model = Stack(make)
    hc = checkpointer(model, policy)
    assert_same(ref, run(model, hc))
    assert hc.stats.replays > 0
    theirs = Stack(make)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h = theirs.inp(torch.randn(BATCH, D))
        for b in theirs.blocks:
            h = checkpoint(b, h, use_reentrant=False)
        h.sum().backward()


def test_region_that_starts_modifying_its_input_later_keeps_that_call():
    """A habit that changes (a block that modifies its input only from the second step on)
    cannot be replayed for that call: it keeps what its forward saved, and later calls recompute."""

    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)
            self.in_place = False

        def forward(self, x):
            return self.lin(x.mul_(2) if self.in_place else x * 2).sin()  # sin saves its input only

    def switching(model, hc):
        out = []
        for s in range(4):
            model.blocks[1].in_place = s >= 1
            out += run(model, hc, steps=1, seed=s)
            if hc is not None:
                out[-1] += (hc.stats.replays, hc.stats.recomputed_bytes)
        return out

    ref = switching(Stack(Sometimes), None)
    model = Stack(Sometimes)
    hc = checkpointer(model, "recompute")
    got = switching(model, hc)
    assert_same(ref, [g[:3] for g in got])
    assert [g[3] for g in got] == [4, 3, 4, 4]  # step 1: block 1 kept its tensors, not replayed
    assert got[1][4] < got[0][4] == got[2][4]


# -- Rule 7: the replay calls the module the way the user called it ------------------------------

def add_hooks(model):
    """A pre-hook that rescales the block's input (a replay without it computes other values),
    and a forward hook whose sigmoid saves a tensor (a replay without it saves one fewer)."""
    for b in model.blocks:
        b.register_forward_pre_hook(lambda mod, args: (args[0] * 1.5,))
        b.register_forward_hook(lambda mod, args, out: torch.sigmoid(out))
    return model


@pytest.mark.parametrize("policy", REPLAYING, ids=REPLAYING_IDS)
def test_user_hooks_run_in_the_replay(policy):
    ref = run(add_hooks(Stack(TanhOut)), None)
    model = add_hooks(Stack(TanhOut))
    hc = checkpointer(model, policy)
    assert_same(ref, run(model, hc))
    assert hc.stats.replays > 0


@pytest.mark.parametrize("policy", ["recompute", every_other], ids=["recompute", "every-other"])
def test_block_compiled_in_place(policy):
    """`block.compile()` compiles `_call_impl`: the replay must run the compiled code, as the
    forward did, and Dynamo must not trace the runtime's hooks."""
    torch._dynamo.reset()

    def compiled():
        model = Stack(TanhOut)
        for b in model.blocks:
            b.compile(backend="aot_eager")
        return model

    ref = run(compiled(), None, steps=3)
    model = compiled()
    hc = checkpointer(model, policy)
    assert_same(ref, run(model, hc, steps=3))
    assert hc.stats.replays == (4 if policy == "recompute" else 2)


def test_replays_inside_the_next_forward_open_no_regions():
    """Pipeline style: a step's backward runs while the next forward is under `with hc:`, so the
    runtime's region hooks are on the blocks the replays call; they must not open regions."""

    def interleaved(model, hc):
        g = torch.Generator().manual_seed(0)
        out, pending = [], None
        for s in range(4):
            with under(hc):
                if pending is not None:
                    pending.backward()
                    out.append({n: p.grad.clone() for n, p in model.named_parameters()})
                    model.zero_grad(set_to_none=True)
                torch.manual_seed(s)
                pending = model(torch.randn(BATCH, D, generator=g))
        pending.backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
        return out

    ref = interleaved(add_hooks(Stack(TanhOut)), None)
    model = add_hooks(Stack(TanhOut))
    hc = checkpointer(model, "recompute")
    got = interleaved(model, hc)
    for s, (a, b) in enumerate(zip(ref, got)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {s}: gradient of {name} differs"
    names = [seg["name"] for seg in hc.report().segments]
    assert [n for n in names if n.startswith("blocks")] == [f"blocks.{i}" for i in range(4)], names


# -- a replay that differs says where and why -----------------------------------------------------

class Branchy(nn.Module):
    """Does other work when `mode` changes between its forward and its replay."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.mode = "same"

    def forward(self, x):
        y = self.lin(x)
        if self.mode == "narrow":
            return y[:, : D // 2].sin().cos().repeat(1, 2)
        if self.mode == "fewer":
            return y * 2  # a product by a number saves nothing
        return y.sin().cos()


CAUSES = ("hook", "torch.compile", "control flow", "random numbers drawn outside torch")


def branchy_loss(mode_in_replay):
    model = Stack(Branchy)
    hc = checkpointer(model, "recompute")
    with hc:
        loss = model(torch.randn(BATCH, D))
    model.blocks[3].mode = mode_in_replay
    return loss


def test_replay_that_saves_another_shape_names_both_ops_and_the_likely_causes():
    loss = branchy_loss("narrow")
    with pytest.raises(OffloadError) as err:
        loss.backward()
    msg = str(err.value)
    assert "recompute of region blocks.3 differs from its forward at saved tensor #2: the forward saved a " \
           "(64, 128) torch.float32 tensor made by addmm (AddmmBackward0), the replay a (64, 64) " \
           "torch.float32 tensor made by slice (SliceBackward0)" in msg, msg
    assert all(cause in msg for cause in CAUSES), msg


def test_replay_that_saves_fewer_tensors_names_the_first_missing_op():
    loss = branchy_loss("fewer")
    with pytest.raises(OffloadError) as err:
        loss.backward()
    msg = str(err.value)
    assert "recompute of region blocks.3 saved 2 tensors for backward, but its forward saved 4; the first " \
           "one the replay did not save is #2, a (64, 128) torch.float32 tensor made by addmm " \
           "(AddmmBackward0)" in msg, msg
    assert all(cause in msg for cause in CAUSES), msg


# -- torch.compile around the whole model -----------------------------------------------------------

@pytest.mark.parametrize("when, policy", [("compiled-under-hc", "recompute"), ("compiled-under-hc", "auto"),
                                          ("compiled-before-hc", "recompute"), ("compiled-before-hc", "auto"),
                                          ("hc-of-compiled", "recompute")])
def test_compiling_the_whole_model_raises_at_the_first_forward(when, policy):
    """Dynamo runs the region hooks of a whole compiled model at graph breaks, or not at all when
    the graph was compiled before they existed (it ignores hooks added later); either way its
    regions cannot be replayed. Compiling the blocks works (test_block_compiled_in_place)."""
    torch._dynamo.reset()
    model = Stack(TanhOut)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(BATCH, D)
    if when == "compiled-before-hc":
        compiled(x).backward()  # a plain compiled step first: its graph has no region hooks
    hc = checkpointer(compiled if when == "hc-of-compiled" else model, policy)
    with pytest.raises(OffloadError, match=r"Compile the blocks.*torch\.compile\(block\)"):
        with hc:
            compiled(x)
    with hc:  # Rule 9: the runtime still works, uncompiled
        loss = model(x)
    loss.backward()
    assert hc.stats.replays == 4


def test_compiling_the_whole_model_with_offload_needs_no_replay():
    """Offload never replays: a whole compiled model trains as it does without the runtime."""
    torch._dynamo.reset()

    def compiled():
        model = Stack(TanhOut)
        return model, torch.compile(model, backend="aot_eager")

    ref_model, ref_compiled = compiled()
    model, compiled_model = compiled()
    hc = checkpointer(model, "offload")
    for s in range(3):
        x = torch.randn(BATCH, D)
        ref_compiled(x).backward()
        with hc:
            loss = compiled_model(x)
        loss.backward()
        for (n, a), b in zip(ref_model.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), f"step {s}: gradient of {n} differs"
        ref_model.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    assert hc.stats.offloaded_bytes > 0


def test_compiled_modules_outside_the_regions_are_no_whole_model():
    """Compiling the modules around the blocks (here the input projection and the head) is fine."""
    torch._dynamo.reset()

    def compiled():
        model = Stack(TanhOut)
        model.inp = torch.compile(model.inp, backend="aot_eager")
        model.head = torch.compile(model.head, backend="aot_eager")
        return model

    ref = run(compiled(), None, steps=3)
    model = compiled()
    hc = checkpointer(model, "recompute")
    assert_same(ref, run(model, hc, steps=3))
    assert hc.stats.replays == 4


# -- the caller's random stream ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_random_stream_after_backward_is_plain_pytorchs(policy):
    """The other tests reseed before every forward, so a replay that left the generator where the
    forward's state put it would go unseen. Here one seed runs through several steps with dropout:
    losses, gradients and the draws after each backward must be plain PyTorch's."""

    def draws(model, hc):
        torch.manual_seed(0)
        out = []
        for s in range(4):
            idx, tgt = make_batch(TINY, 4, seed=s)
            with under(hc):
                _, loss = model(idx, tgt)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()], torch.rand(8)))
            model.zero_grad(set_to_none=True)
        return out

    ref = draws(tiny_gpt(), None)
    model = tiny_gpt()
    hc = checkpointer(model, policy)
    got = draws(model, hc)
    assert hc.stats.replays > 0
    for s, ((la, ga, ra), (lb, gb, rb)) in enumerate(zip(ref, got)):
        assert torch.equal(la, lb), f"step {s}: loss differs"
        assert all(torch.equal(a, b) for a, b in zip(ga, gb)), f"step {s}: gradients differ"
        assert torch.equal(ra, rb), f"step {s}: the draws after backward differ"
