"""Module mode: `hc.attach(module)` runs each forward of `module` that records autograd under the
runtime, for loops the user does not write. Inert under no_grad / inference_mode and inside
`with hc:`; removable; an exception (or a KeyboardInterrupt) in forward leaves the runtime usable."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.gpt import make_batch
from offload import HybridCheckpointer, OffloadError

from .conftest import MIN_OFFLOAD, TINY, assert_bitwise, make_backend, mixed, tiny_gpt, train


def checkpointer(model, policy=mixed, **kw) -> HybridCheckpointer:
    kw.setdefault("host_budget", "64MiB")
    return HybridCheckpointer(model, policy=policy, min_offload_bytes=MIN_OFFLOAD, **kw)


def no_hooks_left() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@pytest.fixture(scope="module")
def reference():
    return train(tiny_gpt(), None, steps=3)


def test_attached_training_is_bitwise_equal_and_moves_bytes(device):
    ref = train(tiny_gpt(device), None, steps=3)
    model = tiny_gpt(device)
    hc = checkpointer(model, backend=make_backend(device))
    handle = hc.attach(model)
    got = train(model, None, steps=3)  # the loop never mentions hc
    handle.remove()
    assert_bitwise(ref, got)
    s = hc.stats
    assert s.forwards == 1 and s.replays == 2 and s.offloaded_bytes > 0 and s.recomputed_bytes > 0
    assert hc.report().offloaded_bytes > 0
    assert no_hooks_left()
    hc.close()


def test_attach_defaults_to_the_model_and_works_as_a_context_manager(reference):
    model = tiny_gpt()
    hc = checkpointer(model, "recompute")
    with hc.attach() as handle:
        assert handle.attached and handle.module is model
        got = train(model, None, steps=3)
    assert not handle.attached
    assert_bitwise(reference, got)
    assert hc.stats.replays == 4
    train(model, None, steps=1)  # removed: plain again
    assert hc.stats.forwards == 1 and hc.stats.replays == 4
    handle.remove()  # idempotent
    hc.close()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, lambda: torch.set_grad_enabled(False)],
                         ids=["no_grad", "inference_mode", "set_grad_enabled"])
def test_inert_when_autograd_records_nothing(mode):
    model = tiny_gpt().eval()
    hc = checkpointer(model)
    idx, tgt = make_batch(TINY, 2)
    with hc.attach(model):
        with mode():
            logits, loss = model(idx, tgt)
    with torch.no_grad():
        ref_logits, ref_loss = model(idx, tgt)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    assert hc.stats.forwards == 0 and no_hooks_left()
    hc.close()


def test_inert_inside_with_hc(reference):
    model = tiny_gpt()
    hc = checkpointer(model)
    with hc.attach(model):
        got = train(model, hc, steps=3)  # `with hc:` around the attached model's forward
    assert_bitwise(reference, got)
    assert hc.stats.forwards == 1 and hc.stats.replays == 2


def test_a_wrapper_around_the_model_can_be_attached(reference):
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args):
            return self.module(*args)

    model = tiny_gpt()
    wrapper = Wrapper(model)
    hc = checkpointer(model)
    with hc.attach(wrapper):
        losses, grads = [], []
        for s in range(3):
            idx, tgt = make_batch(TINY, 4, seed=s)
            torch.manual_seed(1000 + s)
            _, loss = wrapper(idx, tgt)
            torch.manual_seed(7)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
    assert_bitwise(reference, (losses, grads))
    assert hc.stats.replays == 2


def test_attaching_an_unrelated_module_is_refused():
    model = tiny_gpt()
    hc = checkpointer(model)
    with pytest.raises(ValueError, match="neither the model"):
        hc.attach(tiny_gpt())
    with pytest.raises(TypeError, match="nn.Module"):
        hc.attach("model")
    with pytest.raises(TypeError, match="model="):
        checkpointer(None, "offload").attach()
    assert hc.attach(model.transformer.h[0]).attached  # a part of the model is fine


def test_an_exception_in_forward_leaves_the_runtime_usable(reference):
    model = tiny_gpt()
    hc = checkpointer(model)
    handle = hc.attach(model)
    train(model, None, steps=1)
    boom = model.transformer.h[2].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train(model, None, steps=1)
    boom.remove()
    assert no_hooks_left()
    got = train(model, None, steps=3)
    handle.remove()
    assert_bitwise(reference, got)
    assert hc.stats.replays == 2
    assert hc.stats.fallback_count == 0
    hc.close()


@pytest.mark.parametrize("recover", ["next call", "remove"])
def test_a_keyboard_interrupt_in_forward_is_recovered(reference, recover):
    """KeyboardInterrupt is no Exception: PyTorch skips always_call hooks for it, so the runtime
    stays entered until the next call of the module (or remove()) closes it."""
    model = tiny_gpt()
    hc = checkpointer(model)
    handle = hc.attach(model)

    def interrupt(*args):
        raise KeyboardInterrupt

    hook = model.transformer.h[1].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(model, None, steps=1)
    hook.remove()
    if recover == "remove":
        handle.remove()
        assert no_hooks_left()
        got = train(model, hc, steps=3)  # `with hc:` works again
    else:
        got = train(model, None, steps=3)
        handle.remove()
    assert_bitwise(reference, got)
    assert hc.stats.replays == 2 and no_hooks_left()
    hc.close()


def test_a_module_calling_itself_is_one_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(256, 256) for _ in range(3))

        def forward(self, x, again=True):
            for b in self.blocks:
                x = torch.tanh(b(x))
            return self(x, again=False) if again else x

    def run(hc):
        torch.manual_seed(0)
        model = Twice()
        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
        out = []
        ctx = hc(model).attach(model) if hc else None
        for _ in range(3):
            model(x).square().mean().backward()
            out.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad()
        if ctx:
            ctx.remove()
        return out, ctx

    ref, _ = run(None)
    holder = {}

    def make(model):
        holder["hc"] = HybridCheckpointer(model, policy="recompute", host_budget="16MiB")
        return holder["hc"]

    got, handle = run(make)
    for a, b in zip(ref, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Six block calls, five replays: the first one saved only its input, the caller's `x`, which
    # needs no grad and is alive: it comes back as itself, with nothing to replay.
    assert holder["hc"].stats.forwards == 1 and holder["hc"].stats.replays == 5
    assert no_hooks_left()


def test_auto_policy_sees_the_inputs_through_attach():
    """The attached model's own pre-hook (the input signature auto plans by) is installed by the
    runtime after the call began: attach notes the inputs itself."""
    keep_model = tiny_gpt()
    keep = checkpointer(keep_model, "keep")
    train(keep_model, keep, steps=1)
    budget = keep.stats.kept_bytes // 2
    model = tiny_gpt()
    hc = checkpointer(model, "auto", device_budget=budget)
    with hc.attach(model):
        got = train(model, None, steps=4)
    assert_bitwise(train(tiny_gpt(), None, steps=4), got)
    assert hc.plan is not None and "(4, 64)" in hc.plan.signature
    hc.close()


def test_a_with_block_that_never_calls_the_model_is_refused_but_attach_is_not():
    model = tiny_gpt()
    hc = checkpointer(model, "offload", regions=None)
    x = torch.randn(4, 16, 128, requires_grad=True)
    with pytest.raises(OffloadError, match="never called the model"):
        with hc:
            model.lm_head(x).sum()
    with hc.attach(model.lm_head):  # a part of the model, attached: its forwards are the model's
        model.lm_head(x).sum().backward()
    # the refused forward's graph died unused, so the attached forward opened a step of its own
    assert hc.stats.forwards == 1 and hc.stats.step == 2


def test_two_attachments_on_a_model_and_its_part_enter_once(reference):
    model = tiny_gpt()
    hc = checkpointer(model)
    with hc.attach(model), hc.attach(model.transformer.h[0]) as inner:
        got = train(model, None, steps=3)
    assert_bitwise(reference, got)
    assert hc.stats.forwards == 1 and hc.stats.replays == 2
    assert inner.forwards == 0  # always inside the model's forward, where the runtime is active
    hc.close()
