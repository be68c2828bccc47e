"""Layer 4d: selective recompute (`op_policy`) against PyTorch's own selective checkpointing.

Several cases re-express PyTorch's tests of `create_selective_checkpoint_contexts` on our API:
the op-list form, a stateful policy, ops with several or non-tensor outputs, and the count of
matmuls a backward replays. Where PyTorch refuses (a second backward) we must be right instead.
"""
from __future__ import annotations

import functools
import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import (CheckpointPolicy, SelectiveCheckpointContext, checkpoint,
                                    create_selective_checkpoint_contexts)

from offload import HybridCheckpointer
import offload.core.selective as selective

from .conftest import collector_off, settle
from .test_integrations import CountMatmuls

MM = torch.ops.aten.mm.default
MATMULS = {MM, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def runtime(module: nn.Module, op_policy, **kw) -> HybridCheckpointer:
    return HybridCheckpointer(module, policy="recompute", regions=[module], op_policy=op_policy,
                              min_offload_bytes=0, keep_last=0, host_budget="16MiB", **kw)


def torch_selective(fn, policy):
    """`fn` under torch.utils.checkpoint with PyTorch's selective contexts for `policy`."""
    ctx = functools.partial(create_selective_checkpoint_contexts, policy)
    return lambda *args: checkpoint(fn, *args, use_reentrant=False, context_fn=ctx)


class Fn(nn.Module):
    """A region whose forward is `fn`, with one parameter it may use."""

    def __init__(self, fn, d=64):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return self.fn(x, self.w)


def docstring_fn(x, w):
    """The example of `create_selective_checkpoint_contexts`' docstring: two matmuls."""
    return torch.sigmoid(torch.matmul(torch.matmul(x, w), w)) * w


def backward_matmuls_and_grads(module, x, run):
    loss = run(x).sum()
    with CountMatmuls() as counter:
        grads = torch.autograd.grad(loss, [x, module.w])
    return counter.count, grads


@pytest.mark.parametrize("form", ["list", "function"])
def test_op_list_saves_matmuls_like_pytorch(form):
    """PyTorch's test_flops_and_mem, counted in matmuls: saving mm leaves a backward exactly the
    plain one's matmuls; full recompute replays both forward matmuls. Same numbers as
    torch.utils.checkpoint with the same policy."""
    torch.manual_seed(0)
    module = Fn(docstring_fn)
    x = torch.randn(64, 64, requires_grad=True)
    policy = [MM] if form == "list" else (
        lambda ctx, op, *a, **k: CheckpointPolicy.MUST_SAVE if op is MM else CheckpointPolicy.PREFER_RECOMPUTE)
    plain_mm, ref = backward_matmuls_and_grads(module, x, module)
    torch_mm, torch_grads = backward_matmuls_and_grads(module, x, torch_selective(module, policy))
    assert (plain_mm, torch_mm) == (4, 4)
    full = runtime(module, None)
    hc = runtime(module, policy)
    for _ in range(3):
        with full:
            loss = module(x)
        full_mm, full_grads = backward_matmuls_and_grads(module, x, lambda t: loss)
        with hc:
            loss = module(x)
        ours_mm, grads = backward_matmuls_and_grads(module, x, lambda t: loss)
        assert full_mm == 6 and ours_mm == 4
        for a, b, c, d in zip(ref, torch_grads, full_grads, grads):
            assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_empty_op_list_is_full_recompute():
    torch.manual_seed(0)
    module = Fn(docstring_fn)
    x = torch.randn(64, 64, requires_grad=True)
    hc = runtime(module, [])
    with hc:
        loss = module(x)
    count, _ = backward_matmuls_and_grads(module, x, lambda t: loss)
    assert count == 6 and hc.stats.replays == 1


def test_bad_op_policies_are_refused_like_pytorch():
    """PyTorch's test_bad_inputs: a list item that is not an op overload, an overload packet, and
    something that is neither a list nor a function."""
    module = Fn(docstring_fn)
    with pytest.raises(ValueError, match=r"op_policy=\[2\]\): item 0 \(2, a int\) is not an op overload"):
        runtime(module, [2])
    with pytest.raises(ValueError, match=r"torch\.ops\.aten\.sin.*overload packet.*torch\.ops\.aten\.sin\.default"):
        runtime(module, [torch.ops.aten.sin])
    with pytest.raises(TypeError, match=r"op_policy=2\).*list of ops"):
        runtime(module, 2)
    for bad in ([2], [torch.ops.aten.sin]):
        with pytest.raises(ValueError):
            create_selective_checkpoint_contexts(bad)


class Recorder:
    """A stateful policy (the pattern of PyTorch's test_policy_with_state): saves the outputs of
    the second matmul it is asked about, records every call."""

    def __init__(self):
        self.calls: list[tuple[bool, object]] = []
        self.matmuls = 0

    def __call__(self, ctx, op, *args, **kwargs):
        self.calls.append((ctx.is_recompute, op))
        if op in MATMULS:
            self.matmuls += 1
            if self.matmuls == 2:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def busy_fn(x, w):
    """Matmuls, a view, an in-place op, a random op and a multi-output op."""
    h = torch.matmul(x, w).view(-1, w.shape[0])
    h = torch.nn.functional.dropout(torch.tanh(h), 0.2, training=True)
    h.mul_(2)
    var, mean = torch.var_mean(h, dim=0)
    return torch.matmul(h, w).sin() * var + mean


def test_a_stateful_policy_sees_the_calls_torch_checkpoint_gives_it():
    """Same ops, same order, same `is_recompute`, so a stateful policy decides the same way; and
    with the same decisions the gradients are those of a plain run."""
    torch.manual_seed(0)
    module = Fn(busy_fn)
    x = torch.randn(64, 64, requires_grad=True)

    def run(forward, policy):
        torch.manual_seed(1)
        loss = forward(policy)(x).sum()
        forward_calls = list(policy.calls)
        grads = torch.autograd.grad(loss, [x, module.w])
        return forward_calls, policy.calls, grads

    torch.manual_seed(1)
    ref = torch.autograd.grad(module(x).sum(), [x, module.w])
    theirs = run(lambda policy: torch_selective(module, policy), Recorder())
    for _ in range(3):
        policy = Recorder()
        hc = runtime(module, policy)

        def ours(policy):
            def forward(t):
                with hc:
                    return module(t)
            return forward

        got = run(ours, policy)
        assert got[0] == theirs[0]  # forward
        assert got[1] == theirs[1]  # forward and backward
        assert policy.matmuls == 2  # the matmul saved was the second one
        for a, b, c in zip(ref, theirs[2], got[2]):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_policy_is_asked_again_in_the_replay_where_pytorch_does(monkeypatch):
    """PyTorch releases before the policy became forward-only asked it again during recompute
    (ctx.is_recompute=True); under such a release we do too: the replay asks about the same ops,
    in the same order, as the forward did (up to where the replay stops)."""
    monkeypatch.setattr(selective, "torch_consults_on_recompute", lambda: True)
    torch.manual_seed(0)
    module = Fn(busy_fn)
    x = torch.randn(64, 64, requires_grad=True)
    policy = Recorder()
    hc = runtime(module, policy)
    torch.manual_seed(1)
    with hc:
        loss = module(x).sum()
    forward = list(policy.calls)
    grads = torch.autograd.grad(loss, [x, module.w])
    replay = policy.calls[len(forward):]
    assert forward and all(not r for r, _ in forward)
    assert replay and all(r for r, _ in replay)
    assert [op for _, op in replay] == [op for _, op in forward[:len(replay)]]
    torch.manual_seed(1)
    ref = torch.autograd.grad(module(x).sum(), [x, module.w])
    assert all(torch.equal(a, b) for a, b in zip(ref, grads))


def test_the_installed_pytorch_is_probed_right():
    calls = []

    def policy(ctx, op, *args, **kwargs):
        calls.append(ctx.is_recompute)
        return CheckpointPolicy.PREFER_RECOMPUTE

    x = torch.randn(4, requires_grad=True)
    torch_selective(lambda t: t.sin().cos(), policy)(x).sum().backward()
    assert selective.torch_consults_on_recompute() == any(calls)


def test_op_with_two_outputs_is_stored_and_asked_about_like_pytorch():
    """PyTorch's test_function_with_more_than_one_output: var_mean's two outputs are stored."""
    asked = {"ours": 0, "torch": 0}

    def policy(who):
        def fn(ctx, op, *args, **kwargs):
            if op == torch.ops.aten.var_mean.correction:
                asked[who] += 1
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE
        return fn

    def var_mean_fn(x, w):
        a, b = torch.var_mean(x @ w, dim=0)
        return a * b

    torch.manual_seed(0)
    module = Fn(var_mean_fn)
    x = torch.randn(64, 64, requires_grad=True)
    ref = torch.autograd.grad(module(x).sum(), [x, module.w])
    theirs = torch.autograd.grad(torch_selective(module, policy("torch"))(x).sum(), [x, module.w])
    hc = runtime(module, policy("ours"))
    with hc:
        loss = module(x).sum()
    ours = torch.autograd.grad(loss, [x, module.w])
    assert asked["ours"] == asked["torch"] >= 1
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ref, theirs, ours))


_runs = [0]


@torch.library.custom_op("offload_tests::sin_with_extra", mutates_args=())
def sin_with_extra(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    _runs[0] += 1
    return x.sin(), 2


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad, _unused):
    (x,) = ctx.saved_tensors
    return grad * x.cos()


torch.library.register_autograd("offload_tests::sin_with_extra", _backward, setup_context=_setup)


def test_op_with_a_non_tensor_output_is_not_run_again():
    """PyTorch's test_function_with_non_tensor_output: the listed custom op runs once."""
    def fn(x, w):
        return (torch.ops.offload_tests.sin_with_extra(x @ w)[0] * x.sin().exp()).sin()

    torch.manual_seed(0)
    module = Fn(fn)
    x = torch.randn(64, 64, requires_grad=True)
    ops = [torch.ops.offload_tests.sin_with_extra.default]
    ref = torch.autograd.grad(module(x).sum(), [x, module.w])
    _runs[0] = 0
    theirs = torch.autograd.grad(torch_selective(module, ops)(x).sum(), [x, module.w])
    assert _runs[0] == 1
    hc = runtime(module, ops)
    for _ in range(3):
        _runs[0] = 0
        with hc:
            loss = module(x).sum()
        ours = torch.autograd.grad(loss, [x, module.w])
        assert _runs[0] == 1 and hc.stats.replays == 1
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ref, theirs, ours))


def test_backward_twice_where_pytorch_refuses():
    """PyTorch's test_can_only_trigger_recompute_once: its selective checkpointing refuses a second
    backward (retain_graph=True); Rule 1 says unpack is repeatable, so ours gives the right
    gradients both times."""
    policy = [torch.ops.aten.sin.default]

    def fn(x, w):
        return (x @ w).sin().cos().exp()

    torch.manual_seed(0)
    module = Fn(fn)
    x = torch.randn(64, 64, requires_grad=True)
    ref = torch.autograd.grad(module(x).sum(), [x, module.w])
    out = torch_selective(module, policy)(x).sum()
    torch.autograd.grad(out, [x, module.w], retain_graph=True)
    with pytest.raises(RuntimeError, match="Trying to backward an extra time"):
        torch.autograd.grad(out, [x, module.w])
    hc = runtime(module, policy)
    with hc:
        loss = module(x).sum()
    for _ in range(3):
        gc.collect()  # what the last backward recomputed is gone: each one replays
        got = torch.autograd.grad(loss, [x, module.w], retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert hc.stats.replays == 3


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
    with collector_off(not gc_on):
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
    if decision == "MUST_CPU_OFFLOAD":
        assert hc.stats.offloaded_bytes > 0
    settle(hc)
    assert hc.host_pool.in_use == 0


class CountingPolicy:
    """Stateful across blocks and steps: saves whatever op it is asked about every third time,
    so each decision depends on every call before it. Records (is_recompute, op) per call."""

    def __init__(self):
        self.calls: list[tuple[bool, object]] = []

    def __call__(self, ctx, op, *args, **kwargs):
        self.calls.append((ctx.is_recompute, op))
        return CheckpointPolicy.MUST_SAVE if len(self.calls) % 3 == 0 else CheckpointPolicy.PREFER_RECOMPUTE


def calm_fn(x, w):
    """busy_fn without in-place ops (dropout's kernel has two), which PyTorch refuses on a
    stored output; its random op draws a mask instead."""
    h = torch.matmul(x, w).view(-1, w.shape[0])
    h = torch.tanh(h) * (torch.rand_like(h) > 0.2)
    var, mean = torch.var_mean(h, dim=0)
    return torch.matmul(h, w).sin() * var + mean


def test_a_stateful_policy_over_blocks_and_steps_sees_what_torch_checkpoint_gives_it():
    """Three blocks, four steps, no reseeding between them: the policy's call sequence, step by
    step, is the one torch.utils.checkpoint with the same policy around each block gives it; the
    gradients and the RNG stream after each backward are plain PyTorch's."""
    torch.manual_seed(0)
    model = nn.Sequential(Fn(calm_fn), Fn(calm_fn), Fn(calm_fn))
    params = list(model.parameters())
    x = torch.randn(64, 64, requires_grad=True)

    def train(forward, policy):
        torch.manual_seed(1)
        out = []
        for _ in range(4):
            before = len(policy.calls) if policy else 0
            loss = forward(x).sum()
            grads = [g.clone() for g in torch.autograd.grad(loss, params + [x])]
            out.append((policy.calls[before:] if policy else None, grads, torch.rand(4)))
        return out

    ref = train(model, None)
    theirs_policy = CountingPolicy()

    def theirs(t):
        for block in model:
            t = torch_selective(block, theirs_policy)(t)
        return t

    theirs_steps = train(theirs, theirs_policy)
    ours_policy = CountingPolicy()
    hc = HybridCheckpointer(model, policy="recompute", regions=list(model), op_policy=ours_policy,
                            min_offload_bytes=0, keep_last=0, host_budget="16MiB")

    def ours(t):
        with hc:
            return model(t)

    ours_steps = train(ours, ours_policy)
    for ref_step, their_step, our_step in zip(ref, theirs_steps, ours_steps):
        (_, ref_grads, ref_rng), (their_calls, their_grads, _), (calls, grads, rng) = ref_step, their_step, our_step
        assert calls == their_calls and len(calls) > 30
        assert torch.equal(ref_rng, rng)
        for a, b in zip(ref_grads, grads):
            assert torch.equal(a, b)
        for a, b in zip(ref_grads, their_grads):
            assert torch.equal(a, b)
    assert hc.stats.replays == 3


def test_other_op_policy_forms_are_refused_like_pytorch():
    """A tuple (or a string) is neither a list of ops nor a function, for PyTorch and for us."""
    module = Fn(docstring_fn)
    for bad in ((MM,), "mm"):
        with pytest.raises(TypeError, match="policy_fn_or_list must be either a function or a list"):
            create_selective_checkpoint_contexts(bad)
        with pytest.raises(TypeError, match=r"expected a function .* or a list of ops to save"):
            runtime(module, bad)


def test_a_policy_answering_with_bools_like_pytorch():
    """True saves (MUST_SAVE), False recomputes, as PyTorch reads a bool."""
    torch.manual_seed(0)
    module = Fn(docstring_fn)
    x = torch.randn(64, 64, requires_grad=True)
    policy = lambda ctx, op, *a, **k: op is MM  # noqa: E731
    ref = torch.autograd.grad(module(x).sum(), [x, module.w])
    torch_mm, theirs = backward_matmuls_and_grads(module, x, torch_selective(module, policy))
    hc = runtime(module, policy)
    with hc:
        loss = module(x)
    ours_mm, ours = backward_matmuls_and_grads(module, x, lambda t: loss)
    assert torch_mm == ours_mm == 4
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ref, theirs, ours))


def two_draws(x, w):
    h = torch.matmul(x, w) * (torch.rand_like(x) > 0.3)
    return (torch.tanh(h) @ w * torch.randn_like(x)).sin()


def test_listing_a_random_op_still_replays_it_in_order():
    """A listed random op is asked about but never stored: skipping its draw in the replay would
    shift the next random op's draw. With two random ops and the first listed, the gradients over
    several steps are still plain PyTorch's."""
    torch.manual_seed(0)
    module = Fn(two_draws)
    x = torch.randn(64, 64, requires_grad=True)
    ops = [torch.ops.aten.rand_like.default, MM]

    def train(forward):
        torch.manual_seed(1)
        return [torch.autograd.grad(forward(x).sum(), [x, module.w]) + (torch.rand(4),) for _ in range(3)]

    hc = runtime(module, ops)

    def ours(t):
        with hc:
            return module(t)

    for ref, got in zip(train(module), train(ours)):
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert hc.stats.replays == 1


def test_op_list_on_the_tiny_gpt_trains_bitwise():
    """PyTorch's op-list form on a real model (attention, dropout, layer norms), several steps:
    every step's loss and gradients are plain PyTorch's."""
    from .conftest import assert_bitwise, tiny_gpt, train

    ops = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default]
    ref = train(tiny_gpt(), None, steps=3)
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", op_policy=ops, min_offload_bytes=0, host_budget="64MiB")
    assert_bitwise(ref, train(model, hc, steps=3))
    assert hc.stats.replays == model.cfg.n_layer and hc.stats.kept_bytes > 0
