"""Verify mode: every reloaded or recomputed tensor is compared with what forward saved."""
import random

import pytest
import torch
from torch import nn

import offload
from offload import HybridCheckpointer, OffloadError, Verify
from offload.core.handles import OffloadHandle

from .conftest import assert_bitwise, tiny_gpt, train


class Drift(nn.Module):
    """A block whose output depends on how often it ran: a replay differs from its forward."""

    def __init__(self, width: int = 64, source: str = "counter"):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.source = source
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        scale = 1.0 + 0.5 * self.calls if self.source == "counter" else 1.0 + random.random()
        return torch.tanh(self.lin(x) * scale)


class Stack(nn.Module):
    def __init__(self, source: str = "counter", steady: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(64, 64) if steady else Drift(source=source) for _ in range(3)])
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).sum()


def _step(model, hc, x):
    with hc:
        loss = model(x)
    loss.backward()
    return hc.report().verify


@pytest.mark.parametrize("policy", ["keep", "offload", "recompute", "auto"])
def test_a_deterministic_model_reports_no_mismatch_and_unchanged_gradients(policy):
    ref = train(tiny_gpt(), None, steps=4)
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy=policy, verify=True, min_offload_bytes=0)
    assert_bitwise(ref, train(model, hc, steps=4))
    v = hc.report().verify
    assert v["mismatches"] == 0 and v["max_abs_diff"] == 0.0 and v["first_mismatch"] is None
    if policy in ("offload", "recompute"):
        assert v["compared"] > 0
        assert {s["name"] for s in v["segments"]} >= {"transformer.h.0"}
    if policy == "keep":
        assert v["compared"] == 0  # nothing left the device
    hc.close()


@pytest.mark.parametrize("source", ["counter", "python-random"])
def test_a_replay_that_differs_is_flagged_with_the_op_that_produced_the_tensor(source):
    torch.manual_seed(0)
    model = Stack(source)
    hc = HybridCheckpointer(model, policy="recompute", regions=list(model.blocks), verify=True)
    v = _step(model, hc, torch.randn(8, 64))
    assert v["mismatches"] > 0 and v["max_abs_diff"] > 0
    first = v["first_mismatch"]
    assert first["action"] == "recomputed"
    assert first["segment"].startswith("blocks.")
    assert first["op"].startswith("aten::tanh"), first  # the saved tanh output is the first to differ
    assert "verify: first mismatch" in str(hc.report())


def test_strict_raises_at_the_first_mismatch_naming_segment_and_op():
    torch.manual_seed(0)
    model = Stack()
    hc = HybridCheckpointer(model, policy="recompute", regions=list(model.blocks), verify="strict")
    with hc:
        loss = model(torch.randn(8, 64))
    with pytest.raises(OffloadError, match=r"verify: the recomputed tensor #\d+ of blocks\.\d.*aten::"):
        loss.backward()


def test_tolerance_applies_to_recomputed_tensors():
    torch.manual_seed(0)

    class Tiny(Drift):
        def forward(self, x):
            self.calls += 1
            return torch.tanh(self.lin(x) + 1e-6 * self.calls)

    model = Stack(steady=True)
    model.blocks = nn.ModuleList([Tiny() for _ in range(3)])
    x = torch.randn(8, 64)
    loose = HybridCheckpointer(model, policy="recompute", regions=list(model.blocks), verify=Verify(atol=1e-3))
    v = _step(model, loose, x)
    assert v["mismatches"] == 0 and 0 < v["max_abs_diff"] <= 1e-3
    exact = HybridCheckpointer(model, policy="recompute", regions=list(model.blocks), verify=True)
    assert _step(model, exact, x)["mismatches"] > 0


def test_a_corrupted_reload_is_flagged_even_within_a_tolerance(monkeypatch):
    torch.manual_seed(0)
    model = Stack(steady=True)
    hc = HybridCheckpointer(model, policy="offload", regions=None, verify=Verify(atol=10.0), min_offload_bytes=0)
    original = OffloadHandle.unpack
    monkeypatch.setattr(OffloadHandle, "unpack", lambda self: original(self) + 1e-3)
    v = _step(model, hc, torch.randn(8, 64))
    assert v["mismatches"] == v["compared"] > 0  # reloads are bitwise: atol does not apply
    assert v["first_mismatch"]["action"] == "offloaded"


def test_past_reference_bytes_tensors_are_compared_by_checksum():
    torch.manual_seed(0)
    model = Stack()
    hc = HybridCheckpointer(model, policy="recompute", regions=list(model.blocks), verify=Verify(reference_bytes=0))
    v = _step(model, hc, torch.randn(8, 64))
    assert v["reference_bytes"] == 0 and v["checksummed"] == v["compared"] > 0
    assert v["mismatches"] > 0 and v["first_mismatch"]["compared_by"] == "checksum"
    steady = Stack(steady=True)
    hc2 = HybridCheckpointer(steady, policy="recompute", regions=list(steady.blocks), verify=Verify(reference_bytes=0))
    assert _step(steady, hc2, torch.randn(8, 64))["mismatches"] == 0


def test_verify_log_is_per_step_and_in_to_dict():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="recompute", verify=True)
    train(model, hc, steps=1)
    first = hc.report().verify["compared"]
    train(model, hc, steps=1)
    assert hc.report().to_dict()["verify"]["compared"] == first  # a new log each step, not a running sum


@pytest.mark.parametrize("bad", ["yes", 1, Verify])
def test_bad_verify_arguments_are_named(bad):
    with pytest.raises(ValueError, match="verify="):
        HybridCheckpointer(tiny_gpt(), policy="keep", verify=bad)


def test_verify_config_validates_its_fields():
    with pytest.raises(ValueError, match="atol"):
        Verify(atol=-1.0)
    with pytest.raises(ValueError, match="reference_bytes"):
        Verify(reference_bytes=-5)
    assert "Verify" in offload.__all__
