"""Layer 0: user arguments are parsed once, and bad ones are named in the error."""
import pytest
import torch
from torch import nn

from offload import Action, HybridCheckpointer
from offload.core.budget import parse_budget

from .conftest import tiny_gpt


@pytest.mark.parametrize("value, expected", [
    (0, 0), (123, 123), ("512MB", 512 * 10**6), ("12GiB", 12 * 2**30), ("1.5 GiB", int(1.5 * 2**30)),
    ("40%", 400), ("100%", 1000), ("64k", 64 * 1024), ("2048", 2048), (None, None),
])
def test_parse_budget(value, expected):
    assert parse_budget("host_budget", value, lambda: 1000) == expected


@pytest.mark.parametrize("value", ["lots", "12 parsecs", -1, "-5GiB", "150%", 1.5, True, [1]])
def test_bad_budget_names_field_and_value(value):
    with pytest.raises(ValueError) as err:
        parse_budget("host_budget", value, lambda: 1000)
    assert "host_budget" in str(err.value) and repr(value) in str(err.value)


def test_checkpointer_rejects_bad_arguments():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="'lots'"):
        HybridCheckpointer(model, policy="keep", host_budget="lots")
    with pytest.raises(ValueError, match="-1"):
        HybridCheckpointer(model, policy="keep", device_budget=-1)
    with pytest.raises(ValueError, match="'sometimes'"):
        HybridCheckpointer(model, policy="sometimes")
    with pytest.raises(ValueError, match="42"):
        HybridCheckpointer(model, policy=42)
    with pytest.raises(TypeError, match="int"):
        HybridCheckpointer(model, policy="keep", regions=[model.lm_head, 3])
    with pytest.raises(TypeError, match="Linear"):
        HybridCheckpointer(model, policy="keep", regions=model.lm_head)
    with pytest.raises(ValueError, match="'every'"):
        HybridCheckpointer(model, policy="keep", regions="every")
    with pytest.raises(TypeError, match="str"):
        HybridCheckpointer("model", policy="keep")
    with pytest.raises(ValueError, match="recompute needs regions"):
        HybridCheckpointer(model, policy="recompute", regions=None)
    with pytest.raises(ValueError, match="keep_last=-1"):
        HybridCheckpointer(model, policy="keep", keep_last=-1)
    with pytest.raises(ValueError, match="backend='tpu'"):
        HybridCheckpointer(model, policy="keep", backend="tpu")


def test_policy_callable_returning_garbage_is_named():
    model = tiny_gpt()
    answer = ["offload"]
    hc = HybridCheckpointer(model, policy=lambda site: answer[0], host_budget="16MiB")
    idx = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="'offload'"):
        with hc:
            model(idx)
    answer[0] = Action.KEEP
    with hc:  # the runtime is still usable
        model(idx)


def test_regions_auto_finds_the_blocks():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="keep", host_budget="16MiB")
    assert [r.name for r in hc.regions] == [f"transformer.h.{i}" for i in range(4)]
    assert [r.module for r in hc.regions] == list(model.transformer.h)
    explicit = HybridCheckpointer(model, policy=Action.RECOMPUTE, regions=[model.transformer.h[1]],
                                  host_budget="16MiB")
    assert [r.name for r in explicit.regions] == ["transformer.h.1"]
    assert HybridCheckpointer(nn.Linear(2, 2), policy="keep", host_budget=0).regions == []
