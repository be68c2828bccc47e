"""What a user must act on is a `warnings.warn` with `offload.OffloadWarning`: seen without any
logging configured, filterable by category, and issued once per checkpointer where it would
otherwise repeat every step."""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import offload
from offload import HybridCheckpointer, OffloadWarning

from .conftest import MIN_OFFLOAD, assert_bitwise, tiny_gpt, train


def offload_warnings(caught, text: str) -> list:
    return [w for w in caught if issubclass(w.category, OffloadWarning) and text in str(w.message)]


def test_offload_warning_is_public_and_a_user_warning():
    assert "OffloadWarning" in offload.__all__
    assert issubclass(OffloadWarning, UserWarning)


SEEN_WITHOUT_LOGGING = r"""
import torch
from torch import nn
import offload
offload.HybridCheckpointer(nn.Linear(2, 2), policy="keep", host_budget="1MiB")
"""


def test_warnings_reach_stderr_with_no_logging_configured():
    """The package's NullHandler silences logging's last-resort handler; a warning is not silenced."""
    out = subprocess.run([sys.executable, "-c", SEEN_WITHOUT_LOGGING], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OffloadWarning" in out.stderr and "no repeated blocks" in out.stderr, out.stderr
    assert "<string>:5" in out.stderr, out.stderr  # attributed to the user's line, not ours


def test_no_repeated_blocks_warns():
    with pytest.warns(OffloadWarning, match="no repeated blocks in Linear"):
        HybridCheckpointer(nn.Linear(2, 2), policy="keep", host_budget="1MiB")


def test_the_category_can_be_filtered():
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadWarning)
        with pytest.raises(OffloadWarning):
            HybridCheckpointer(nn.Linear(2, 2), policy="keep", host_budget="1MiB")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=OffloadWarning)
        HybridCheckpointer(nn.Linear(2, 2), policy="keep", host_budget="1MiB")
    assert not offload_warnings(caught, "")


def test_host_pool_fallback_warns_once_per_checkpointer():
    ref = train(tiny_gpt(), None, steps=3)
    for steps in (3, 1):  # a second checkpointer warns again: once per checkpointer, not per process
        model = tiny_gpt()
        hc = HybridCheckpointer(model, policy="offload", min_offload_bytes=MIN_OFFLOAD, host_budget=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = train(model, hc, steps=steps)
        assert_bitwise((ref[0][:steps], ref[1][:steps]), got)  # the tensors stayed on the device
        assert hc.stats.fallback_count > 1
        hits = offload_warnings(caught, "host pool is full")
        assert len(hits) == 1, [str(w.message) for w in caught]
        assert "host_budget=1" in str(hits[0].message)
        hc.close()


def test_a_fallback_warning_turned_into_an_error_leaves_the_runtime_usable():
    """Rule 9 holds when a user's filter turns the warning into an exception inside a pack hook."""
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="offload", min_offload_bytes=MIN_OFFLOAD, host_budget=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadWarning)
        with pytest.raises(OffloadWarning, match="host pool is full"):
            train(model, hc, steps=1)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # our hooks came off
    ref = train(tiny_gpt(), None, steps=2)
    assert_bitwise(ref, train(model, hc, steps=2))
    hc.close()


def test_an_infeasible_auto_plan_warns():
    model = tiny_gpt()
    hc = HybridCheckpointer(model, policy="auto", device_budget=1, host_budget="64MiB",
                            min_offload_bytes=MIN_OFFLOAD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, hc, steps=4)
    hits = offload_warnings(caught, "infeasible")
    assert len(hits) == 1, [str(w.message) for w in caught]
    assert "device_budget" in str(hits[0].message)
    hc.close()


def test_a_monitor_interval_too_long_for_its_pcie_counters_warns():
    from offload import Monitor
    from .test_monitor import FakeGpu, FakeNvml

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(0, interval_s=0.5, nvml_module=FakeNvml([FakeGpu(value_type=1)])):  # 32-bit counters
            pass
    hits = offload_warnings(caught, "interval_s=0.5")
    assert len(hits) == 1 and "32-bit" in str(hits[0].message), [str(w.message) for w in caught]
