"""Backward's working set, measured per segment on auto's warm-up step (offload/auto/workset.py)."""
import torch

from offload import HybridCheckpointer
from offload.auto.workset import END, window_peaks

from .conftest import MIN_OFFLOAD, assert_bitwise, tiny_gpt, train


def test_window_peaks_are_peaks_above_each_windows_start():
    events = [(1, 100), (3, 50), (4, -120), (6, 300), (7, -300), (9, 10)]
    marks = [(2, "a"), (5, "b"), (8, END)]
    # a: starts at 100, reaches 150; b: starts at 30, reaches 330; nothing after END counts
    assert window_peaks(events, marks) == {"a": 50, "b": 300}
    assert window_peaks(events, [(0, "a"), (2, "a"), (10, END)]) == {"a": 230}  # the larger of two: 100, 330-100
    assert window_peaks(events, []) == {}


def _auto(model, **kw):
    return HybridCheckpointer(model, policy="auto", min_offload_bytes=MIN_OFFLOAD, host_budget="64MiB", **kw)


def test_auto_measures_each_segments_backward_working_set_and_plans_with_it():
    ref = train(tiny_gpt(), None, steps=4)
    model = tiny_gpt()
    hc = _auto(model, device_budget="8MiB")
    assert_bitwise(ref, train(model, hc, steps=4))
    policy = hc._runtime.policy
    (sig, profile), = policy.profiles.items()
    ws = {s.name: s.backward_working_set_bytes for s in profile.segments}
    tail = profile.segments[-1]
    logits_grad = 4 * model.cfg.block_size * model.cfg.vocab_size * 4  # batch 4, fp32
    assert ws[tail.name] >= logits_grad  # the head's backward allocates the logits' gradient
    assert all(ws[f"transformer.h.{i}"] > 0 for i in range(4))
    # A budget the user gave is planned whole: not the flat half-a-segment estimate, and not
    # the parameters' gradients either (the budget bounds activation memory)
    assert policy.reserves[sig] == 0
    assert hc._runtime.backward_marker is None  # the probe stopped after its step
    assert not torch._C._autograd._profiler_enabled()


def test_the_default_budget_holds_back_the_parameters_gradients():
    model = tiny_gpt()
    hc = _auto(model)  # no device_budget: free memory now, before backward allocates the gradients
    train(model, hc, steps=3)
    policy = hc._runtime.policy
    (sig, profile), = policy.profiles.items()
    assert profile.has_working_sets
    assert policy.reserves[sig] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_the_probe_stops_at_the_next_forward_at_close_or_when_the_checkpointer_dies():
    import gc
    for end in ("forward", "close", "collected"):
        model = tiny_gpt()
        hc = _auto(model, device_budget="8MiB")
        train(model, hc, steps=1)  # the warm-up step: the probe records it
        assert torch._C._autograd._profiler_enabled()
        if end == "forward":
            train(model, hc, steps=1)
            assert hc._runtime.policy.worksets  # measured
        elif end == "close":
            hc.close()
        else:
            del hc
            gc.collect()
        assert not torch._C._autograd._profiler_enabled(), end
