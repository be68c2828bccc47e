"""Layer 4: the runtime on a small GPT: bitwise-equal gradients for every policy, faults, memory."""
import gc

import pytest
import torch

from offload import HybridCheckpointer, PeakMemory
from bench.gpt import make_batch

from .conftest import MIN_OFFLOAD, TINY, assert_bitwise, make_backend, mixed, settle, tiny_gpt, train, under


POLICIES = ["keep", "offload", "recompute", mixed]


def checkpointer(model, policy, device, delay=0.0, **kw):
    kw.setdefault("host_budget", "256MiB")
    return HybridCheckpointer(model, policy=policy, backend=make_backend(device, delay),
                              min_offload_bytes=MIN_OFFLOAD, slab_bytes=1 << 22, **kw)


@pytest.fixture(scope="module")
def reference():
    return {mode: train(tiny_gpt(), None, mode=mode) for mode in ("backward", "grad", "inputs")}


@pytest.mark.parametrize("mode", ["backward", "grad", "inputs"])
@pytest.mark.parametrize("policy", POLICIES, ids=["keep", "offload", "recompute", "mixed"])
def test_gradients_bitwise_equal_to_plain(reference, policy, mode):
    model = tiny_gpt()
    hc = checkpointer(model, policy, torch.device("cpu"))
    assert_bitwise(reference[mode], train(model, hc, mode=mode))
    s = hc.stats
    if policy in ("offload", mixed):
        assert s.offloaded_bytes > 0 and s.h2d_bytes == s.d2h_bytes > 0  # it really moved
    if policy in ("recompute", mixed):
        assert s.recomputed_bytes > 0 and s.replays == (4 if policy == "recompute" else 2)
    if policy == "keep":
        assert s.offloaded_bytes == s.recomputed_bytes == 0


@pytest.mark.parametrize("policy", POLICIES, ids=["keep", "offload", "recompute", "mixed"])
def test_delayed_copies_stay_bitwise_and_pool_returns_to_zero(device, policy):
    ref = train(tiny_gpt(device), None)
    model = tiny_gpt(device)
    hc = checkpointer(model, policy, device, delay=0.003)
    assert_bitwise(ref, train(model, hc))
    settle(hc)
    assert hc.host_pool.in_use == 0
    assert getattr(hc.backend, "poisoned", 0) == 0


@pytest.mark.slow
def test_fifty_steps_leave_nothing_behind():
    cfg = TINY.__class__(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.1)
    model = tiny_gpt(cfg=cfg)
    hc = HybridCheckpointer(model, policy=mixed, backend=make_backend(torch.device("cpu"), 0.0005),
                            min_offload_bytes=4096, host_budget="64MiB", slab_bytes=1 << 20)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    counts = []
    for step in range(50):
        train(model, hc, steps=1, batch=2)
        settle(hc)
        assert hc.host_pool.in_use == 0, f"step {step}: host blocks still in use"
        if step in (9, 49):
            counts.append(live_tensors())
    assert counts[1] <= counts[0], f"live tensors grew from {counts[0]} to {counts[1]}"
    assert hc.stats.offloaded_bytes > 0 and hc.stats.recomputed_bytes > 0


def test_retain_graph_second_backward_equal_and_without_it_pytorch_error():
    for policy in POLICIES:
        model = tiny_gpt()
        hc = checkpointer(model, policy, torch.device("cpu"))
        idx, tgt = make_batch(TINY, 4)
        torch.manual_seed(3)
        with hc:
            _, loss = model(idx, tgt)
        loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss.backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters())), policy
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()


def test_two_forwards_then_one_backward_of_the_sum():
    ref_model = tiny_gpt()
    a, ta = make_batch(TINY, 2, seed=1)
    b, tb = make_batch(TINY, 2, seed=2)
    torch.manual_seed(5)
    (ref_model(a, ta)[1] + ref_model(b, tb)[1]).backward()
    for policy in POLICIES:
        model = tiny_gpt()
        hc = checkpointer(model, policy, torch.device("cpu"), delay=0.001)
        torch.manual_seed(5)
        with hc:
            la = model(a, ta)[1]
        with hc:
            lb = model(b, tb)[1]
        (la + lb).backward()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(p.grad, q.grad), (policy, n)
        assert hc.stats.forwards == 2


def test_small_host_budget_falls_back_and_counts():
    ref = train(tiny_gpt(), None)
    model = tiny_gpt()
    hc = checkpointer(model, "offload", torch.device("cpu"), host_budget=1 << 20)
    assert_bitwise(ref, train(model, hc))
    s = hc.stats
    assert s.fallback_count > 0 and s.fallback_bytes > 0
    assert s.offloaded_bytes > 0  # the first megabyte still moved
    assert hc.host_pool.reserved <= 1 << 20 and s.host_high_water <= 1 << 20
    report = hc.report()
    assert report.fallback_count == s.fallback_count
    assert "fallbacks" in str(report)


class Boom(Exception):
    pass


def test_exception_in_forward_propagates_and_next_step_works():
    ref = train(tiny_gpt(), None, steps=1)
    for policy in POLICIES:
        model = tiny_gpt()
        hc = checkpointer(model, policy, torch.device("cpu"))
        handle = model.transformer.h[2].register_forward_hook(lambda *a: (_ for _ in ()).throw(Boom()))
        idx, tgt = make_batch(TINY, 4)
        with pytest.raises(Boom):
            with hc:
                model(idx, tgt)
        handle.remove()
        gc.collect()
        settle(hc)
        assert hc.host_pool.in_use == 0
        # No saved-tensor hooks are left on: a saved tensor takes hooks of its own only then.
        y = torch.randn(4, requires_grad=True).exp()
        y.grad_fn._raw_saved_result.register_hooks(lambda t: t, lambda t: t)
        assert_bitwise(ref, train(model, hc, steps=1))


def test_exception_in_recompute_during_backward_then_next_step_works():
    ref = train(tiny_gpt(), None, steps=1)
    model = tiny_gpt()
    hc = checkpointer(model, "recompute", torch.device("cpu"))
    fail = [False]

    def hook(*args):
        if fail[0]:
            raise Boom("replay failed")

    handle = model.transformer.h[1].mlp.register_forward_pre_hook(hook)  # runs again in the replay
    idx, tgt = make_batch(TINY, 4)
    with hc:
        _, loss = model(idx, tgt)
    fail[0] = True
    with pytest.raises(Boom):
        loss.backward()
    fail[0] = False
    handle.remove()
    del loss
    settle(hc)
    model.zero_grad(set_to_none=True)
    assert_bitwise(ref, train(model, hc, steps=1))


def test_outside_the_context_the_model_is_plain():
    model = tiny_gpt()
    hc = checkpointer(model, "offload", torch.device("cpu"))
    train(model, hc, steps=1)
    before = hc.stats.d2h_bytes
    idx, tgt = make_batch(TINY, 4)
    _, loss = model(idx, tgt)  # no `with hc:`
    loss.backward()
    assert hc.stats.d2h_bytes == before
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def peak_of(policy, batch=8):
    model = tiny_gpt()
    hc = None
    if policy is not None:
        hc = checkpointer(model, policy, torch.device("cpu"))
        train(model, hc, steps=1, batch=batch)  # warm-up: the host pool grows its slabs here
    idx, tgt = make_batch(TINY, batch)
    with PeakMemory("cpu") as pm:
        with under(hc):
            _, loss = model(idx, tgt)
        loss.backward()
    return pm.peak_bytes, hc


def test_peak_activation_memory_per_policy():
    plain, _ = peak_of(None)
    keep, _ = peak_of("keep")
    recompute, hc_r = peak_of("recompute")
    offload, hc_o = peak_of("offload")
    assert abs(keep - plain) <= 0.02 * plain  # keep is plain PyTorch
    assert recompute < 0.7 * keep, (recompute, keep)
    # offload holds on the device only what it kept, plus reloads of about two blocks at a time
    offloaded = hc_o.stats.offloaded_bytes
    assert offloaded > 0.5 * hc_o.stats.kept_bytes
    assert offload < keep - 0.4 * offloaded, (offload, keep, offloaded)


def test_recompute_peak_is_not_above_torch_checkpoint():
    """Recomputed tensors die with the node that used them, as in torch.utils.checkpoint."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Wrapped(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    def peak(model, hc):
        idx, tgt = make_batch(TINY, 8)
        for measure in (False, True):  # warm-up, then measured
            torch.manual_seed(1)
            with PeakMemory("cpu") as pm:
                with under(hc):
                    loss = model(idx, tgt)[1]
                loss.backward()
            model.zero_grad(set_to_none=True)
        return pm.peak_bytes

    theirs = tiny_gpt()
    for i, block in enumerate(theirs.transformer.h):
        theirs.transformer.h[i] = Wrapped(block)
    ours = tiny_gpt()
    assert peak(ours, checkpointer(ours, "recompute", torch.device("cpu"))) <= peak(theirs, None)


def test_last_block_stays_resident_under_offload():
    """Rule 6: backward needs the last block at once; offloading it would be fully exposed."""
    model = tiny_gpt()
    hc = checkpointer(model, "offload", torch.device("cpu"))
    train(model, hc, steps=2)
    by_name = {seg["name"]: seg for seg in hc.report().segments}
    assert by_name["transformer.h.3"]["offloaded"] == 0 and by_name["transformer.h.3"]["kept"] > 0
    assert all(by_name[f"transformer.h.{i}"]["offloaded"] > 0 for i in range(3))


def test_backward_on_another_thread_than_forward():
    """Rule 8: unpack hooks may run on a thread other than the forward's."""
    import threading
    ref = train(tiny_gpt(), None, steps=1)
    for policy in POLICIES:
        model = tiny_gpt()
        hc = checkpointer(model, policy, torch.device("cpu"), delay=0.001)
        idx, tgt = make_batch(TINY, 4, seed=0)
        torch.manual_seed(1000)
        with hc:
            _, loss = model(idx, tgt)
        errors = []

        def run():
            try:
                loss.backward()
            except BaseException as e:  # surfaced below
                errors.append(e)

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        assert not errors, errors
        assert torch.equal(loss.detach(), ref[0][0])
        for (name, p) in model.named_parameters():
            assert torch.equal(p.grad, ref[1][0][name]), (policy, name)
