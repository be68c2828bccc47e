"""Layer 0: user arguments are parsed once, and bad ones are named in the error."""
import pytest
import torch
from torch import nn

from offload import Action, HybridCheckpointer, OffloadError
from offload.core.budget import parse_budget

from .conftest import tiny_gpt


@pytest.mark.parametrize("value, expected", [
    (123, 123), ("512MB", 512 * 10**6), ("12GiB", 12 * 2**30), ("1.5 GiB", int(1.5 * 2**30)),
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
    assert HybridCheckpointer(nn.Linear(2, 2), policy="keep", host_budget=1).regions == []


@pytest.mark.parametrize("value", [0, "0", "0%", "0.0 %", "0GiB", "0.0001%"])
def test_zero_budget_is_rejected_naming_the_value(value):
    """A budget of 0 bytes makes every offload fall back (host) or nothing fit (device): say so."""
    with pytest.raises(ValueError, match="0 bytes") as err:
        parse_budget("host_budget", value, lambda: 1000)
    assert "host_budget" in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize("value", [0, "0", "0%"])
def test_checkpointer_rejects_zero_budgets(value):
    model = tiny_gpt()
    for field in ("host_budget", "device_budget"):
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            HybridCheckpointer(model, policy="offload", **{field: value})


@pytest.mark.parametrize("value", ["12Gb", "12gb", "512mb", "64kb", "1Gib", "100b", "2 tb"])
def test_lower_case_b_is_bits_and_rejected(value):
    with pytest.raises(ValueError, match="bits") as err:
        parse_budget("host_budget", value, lambda: 1000)
    assert repr(value) in str(err.value)
    number = value.rstrip("bBiIkKmMgGtT ")
    assert f"'{number}" in str(err.value)  # the fix is spelled out: '12GB' or '12GiB'


@pytest.mark.parametrize("value, expected", [("12GB", 12 * 10**9), ("512kB", 512 * 10**3), ("1gB", 10**9),
                                             ("2GiB", 2 * 2**30), ("3giB", 3 * 2**30), ("100B", 100)])
def test_upper_case_b_is_bytes_whatever_the_prefix_case(value, expected):
    assert parse_budget("host_budget", value, lambda: 1000) == expected


def test_cuda_backend_without_cuda_is_an_offload_error_naming_the_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(OffloadError, match="backend='cuda'") as err:
        HybridCheckpointer(tiny_gpt(), policy="offload", backend="cuda", host_budget="16MiB")
    assert "CUDA" in str(err.value) and "cpu" in str(err.value)


@pytest.mark.parametrize("backend", ["auto", "cuda", "emulated"])
def test_model_on_meta_is_an_offload_error_naming_the_device(backend):
    with torch.device("meta"):
        model = tiny_gpt(device="meta")
    with pytest.raises(OffloadError, match="meta") as err:
        HybridCheckpointer(model, policy="offload", backend=backend, host_budget="16MiB")
    assert "to_empty" in str(err.value)


def test_cuda_backend_for_a_model_on_the_cpu_is_an_offload_error():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(OffloadError, match="cpu"):
        HybridCheckpointer(tiny_gpt(), policy="offload", backend="cuda", host_budget="16MiB")
