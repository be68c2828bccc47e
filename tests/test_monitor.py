"""Monitor layer: NVML reader against a fake pynvml, host memory and cgroups, the sampler."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from offload.observe import hostmem
from offload.observe.monitor import Monitor, Sample, summarize
from offload.observe.nvml import (NvmlDevice, NvmlLibrary, NvmlReading, NvmlUnavailableError, counter_delta,
                          nvml_status, pcie_delta)

REPO = Path(__file__).resolve().parents[1]


# -- a fake pynvml ---------------------------------------------------------------------------
class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(3)


class NVMLError_DriverNotLoaded(NVMLError):
    def __init__(self) -> None:
        super().__init__(9)


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(12)


class NVMLError_FunctionNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(13)


class FakeGpu:
    """One scripted device. Scripts advance one step per call and then hold their last value."""

    def __init__(self, uuid: str = "GPU-00000000-0000-0000-0000-000000000000", *,
                 tx: list[int] = (0,), rx: list[int] = (0,), value_type: int = 3,
                 counters_supported: bool = True, tx_kbps: int = 1000, rx_kbps: int = 2000,
                 used: list[int] = (100,), util: tuple[int, int] = (40, 20),
                 util_error: Exception | None = None, memory_error: Exception | None = None) -> None:
        self.uuid, self.tx, self.rx, self.value_type = uuid, list(tx), list(rx), value_type
        self.counters_supported, self.tx_kbps, self.rx_kbps = counters_supported, tx_kbps, rx_kbps
        self.used, self.util, self.util_error, self.memory_error = list(used), util, util_error, memory_error
        self.field_calls = self.throughput_calls = 0
        self.exhausted = threading.Event()  # set once every counter script has been read

    def step(self, script: list[int], call: int) -> int:
        return script[min(call, len(script) - 1)]


class FakeNvml:
    """Stands in for the ``pynvml`` module: same function names, constants and error classes."""

    NVMLError, NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    NVMLError_DriverNotLoaded, NVMLError_LibraryNotFound = NVMLError_DriverNotLoaded, NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_UNKNOWN = 3, 13, 999
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES, NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 197, 198
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
    NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 1, 3
    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None,
                 memory_v2: bool = True) -> None:
        self.gpus, self.init_error, self.memory_v2 = gpus, init_error, memory_v2
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        return h.uuid

    def nvmlDeviceGetFieldValues(self, h: FakeGpu, ids: list[int]) -> list[SimpleNamespace]:
        call, h.field_calls = h.field_calls, h.field_calls + 1
        if call + 1 >= max(len(h.tx), len(h.rx)):
            h.exhausted.set()
        member = {1: "uiVal", 3: "ullVal"}[h.value_type]
        out = []
        for fid in ids:
            script = h.tx if fid == self.NVML_FI_DEV_PCIE_COUNT_TX_BYTES else h.rx
            ret = 0 if h.counters_supported else self.NVML_ERROR_NOT_SUPPORTED
            value = SimpleNamespace(**{member: h.step(script, call) if ret == 0 else 0})
            out.append(SimpleNamespace(fieldId=fid, nvmlReturn=ret, valueType=h.value_type, value=value))
        return out

    def nvmlDeviceGetPcieThroughput(self, h: FakeGpu, counter: int) -> int:
        h.throughput_calls += 1
        return h.tx_kbps if counter == self.NVML_PCIE_UTIL_TX_BYTES else h.rx_kbps

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu, version: int | None = None) -> SimpleNamespace:
        if h.memory_error is not None:
            raise h.memory_error
        used = h.step(h.used, h.field_calls - 1)
        if version is None:
            return SimpleNamespace(total=1000, free=1000 - used - 10, used=used + 10)
        if not self.memory_v2:
            raise NVMLError_FunctionNotFound()
        return SimpleNamespace(version=version, total=1000, reserved=10, free=1000 - used - 10, used=used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        if h.util_error is not None:
            raise h.util_error
        return SimpleNamespace(gpu=h.util[0], memory=h.util[1])

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: FakeGpu) -> int:
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: FakeGpu) -> int:
        return 16


def open_fake(gpu: FakeGpu, **kw: object) -> tuple[NvmlDevice, FakeNvml]:
    fake = FakeNvml([gpu], **kw)
    return NvmlDevice.open(0, library=NvmlLibrary(fake), cuda_uuid=gpu.uuid), fake


# -- nvml ------------------------------------------------------------------------------------
def test_counter_delta_handles_wrap() -> None:
    assert counter_delta(5, 12, 32) == 7
    assert counter_delta(2**32 - 100, 50, 32) == 150
    assert counter_delta(2**64 - 1, 0, 64) == 1
    a = NvmlReading(pcie_tx_bytes=2**32 - 1, pcie_rx_bytes=10, pcie_counter_bits=32)
    b = NvmlReading(pcie_tx_bytes=3, pcie_rx_bytes=30, pcie_counter_bits=32)
    assert pcie_delta(a, b) == (4, 20)
    assert pcie_delta(a, NvmlReading(pcie_rx_bytes=40, pcie_counter_bits=32)) == (None, 30)


@pytest.mark.parametrize("value_type,bits", [(1, 32), (3, 64)])
def test_counter_width_comes_from_value_type(value_type: int, bits: int) -> None:
    dev, _ = open_fake(FakeGpu(tx=[7], rx=[9], value_type=value_type))
    r = dev.read()
    assert (r.pcie_tx_bytes, r.pcie_rx_bytes, r.pcie_counter_bits) == (7, 9, bits)
    assert r.pcie_tx_kbps is None and r.pcie_rx_kbps is None
    dev.close()


def test_unsupported_field_falls_back_to_throughput() -> None:
    gpu = FakeGpu(counters_supported=False, tx_kbps=1500, rx_kbps=2500)
    dev, _ = open_fake(gpu)
    for _ in range(3):
        r = dev.read()
        assert (r.pcie_tx_bytes, r.pcie_rx_bytes, r.pcie_counter_bits) == (None, None, None)
        assert (r.pcie_tx_kbps, r.pcie_rx_kbps) == (1500, 2500)
    assert gpu.field_calls == 1  # NOT_SUPPORTED is remembered, not asked again
    assert gpu.throughput_calls == 6
    dev.close()


def test_raising_call_gives_none_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    gpu = FakeGpu(tx=[1], rx=[2], used=[300], util_error=NVMLError(999))
    dev, _ = open_fake(gpu)
    with caplog.at_level(logging.DEBUG, logger="offload.observe.nvml"):
        readings = [dev.read() for _ in range(3)]
    for r in readings:
        assert r.util_gpu_pct is None and r.util_memory_pct is None
        assert (r.pcie_tx_bytes, r.memory_used_bytes, r.memory_reserved_bytes) == (1, 300, 10)
        assert (r.pcie_link_gen, r.pcie_link_width) == (5, 16)
    assert sum("utilization" in rec.getMessage() for rec in caplog.records) == 1
    dev.close()


def test_memory_v1_fallback_has_no_reserved() -> None:
    dev, _ = open_fake(FakeGpu(used=[300]), memory_v2=False)
    r = dev.read()
    assert (r.memory_total_bytes, r.memory_used_bytes, r.memory_reserved_bytes) == (1000, 310, None)
    dev.close()


def test_uuid_mapping_picks_the_right_handle(caplog: pytest.LogCaptureFixture) -> None:
    uuids = [f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-1111-2222-3333-44444444444{i}" for i in range(3)]
    fake = FakeNvml([FakeGpu(u) for u in uuids])
    lib = NvmlLibrary(fake)
    torch_like = SimpleNamespace(bytes=bytes.fromhex(uuids[2][4:].replace("-", "")))
    assert NvmlDevice.open(0, library=lib, cuda_uuid=torch_like).nvml_index == 2
    assert NvmlDevice.open(0, library=lib, cuda_uuid=uuids[1][4:].upper()).nvml_index == 1
    with caplog.at_level(logging.WARNING, logger="offload.observe.nvml"):
        assert NvmlDevice.open(0, library=lib, cuda_uuid="GPU-deadbeef").nvml_index == 0
    assert any("UUID" in rec.getMessage() for rec in caplog.records)


def test_library_is_reference_counted() -> None:
    fake = FakeNvml([FakeGpu()])
    lib = NvmlLibrary(fake)
    a = NvmlDevice.open(0, library=lib, cuda_uuid=fake.gpus[0].uuid)
    b = NvmlDevice.open(0, library=lib, cuda_uuid=fake.gpus[0].uuid)
    a.close()
    a.close()
    assert (fake.inits, fake.shutdowns) == (1, 0)
    b.close()
    assert (fake.inits, fake.shutdowns) == (1, 1)


@pytest.mark.parametrize("error,word", [(NVMLError_LibraryNotFound(), "LibraryNotFound"),
                                        (NVMLError_DriverNotLoaded(), "DriverNotLoaded")])
def test_nvml_status_reports_missing_driver(error: Exception, word: str) -> None:
    ok, reason = nvml_status(FakeNvml([FakeGpu()], init_error=error))
    assert not ok and reason.startswith("NVML unavailable: ") and word in reason
    with pytest.raises(NvmlUnavailableError, match="NVML unavailable"):
        NvmlDevice.open(0, library=NvmlLibrary(FakeNvml([], init_error=error)))


def test_nvml_status_no_gpu_and_working() -> None:
    empty = FakeNvml([])
    assert nvml_status(empty) == (False, "NVML unavailable: no GPU found (nvmlDeviceGetCount() == 0)")
    working = FakeNvml([FakeGpu()])
    assert nvml_status(working) == (True, "")
    assert (empty.inits, empty.shutdowns, working.inits, working.shutdowns) == (1, 1, 1, 1)


def test_nvml_status_real_machine_does_not_raise() -> None:
    ok, reason = nvml_status()
    assert (ok and reason == "") or reason.startswith("NVML unavailable: ")


# -- summary ---------------------------------------------------------------------------------
def _sample(t: float, reading: NvmlReading | None, rss: int = 1) -> Sample:
    return Sample(t, rss, 1000 - rss, None, reading)


def test_summary_from_wrapping_counters_is_hand_computed() -> None:
    tx = [2**32 - 300, 2**32 - 100, 400, 1400]  # wraps between the 2nd and 3rd sample
    times = [0.0, 0.5, 1.0, 2.0]
    samples = [_sample(t, NvmlReading(pcie_tx_bytes=c, pcie_rx_bytes=10 * i, pcie_counter_bits=32,
                                      memory_used_bytes=100 * i, memory_reserved_bytes=7,
                                      util_gpu_pct=10 * i, pcie_link_gen=4 + i % 2,
                                      pcie_link_width=16), rss=5 + i)
               for i, (t, c) in enumerate(zip(times, tx))]
    s = summarize(samples)
    assert s["pcie_tx_bytes"] == 200 + 500 + 1000 and s["pcie_tx_source"] == "counters"
    assert s["pcie_tx_mean_gbps"] == pytest.approx(1700 / 2.0 / 1e9)
    assert s["pcie_tx_peak_gbps"] == pytest.approx(max(200 / 0.5, 500 / 0.5, 1000 / 1.0) / 1e9)
    assert s["pcie_rx_bytes"] == 30 and s["pcie_rx_peak_gbps"] == pytest.approx(20 / 1e9)
    assert (s["samples"], s["duration_s"], s["peak_rss_bytes"], s["min_host_available_bytes"]) == (4, 2.0, 8, 992)
    assert (s["peak_device_used_bytes"], s["peak_device_reserved_bytes"]) == (300, 7)
    assert s["mean_util_gpu_pct"] == pytest.approx(15.0) and s["mean_util_memory_pct"] is None
    assert (s["pcie_link_gen"], s["pcie_link_width"]) == (5, 16)


def test_summary_integrates_throughput() -> None:
    kbps = [100, 300, 300]
    samples = [_sample(t, NvmlReading(pcie_tx_kbps=k)) for t, k in zip([0.0, 1.0, 3.0], kbps)]
    s = summarize(samples)
    expected = (200 * 1.0 + 300 * 2.0) * 1024  # trapezoid: mean rate of each interval x its length
    assert s["pcie_tx_bytes"] == expected and s["pcie_tx_source"] == "throughput"
    assert s["pcie_tx_mean_gbps"] == pytest.approx(expected / 3.0 / 1e9)
    assert s["pcie_tx_peak_gbps"] == pytest.approx(300 * 1024 / 1e9)
    assert s["pcie_rx_bytes"] is None and s["pcie_rx_source"] is None


def test_summary_of_nothing() -> None:
    s = summarize([])
    assert s["samples"] == 0 and s["duration_s"] == 0.0 and s["pcie_tx_bytes"] is None


# -- monitor ---------------------------------------------------------------------------------
def test_monitor_with_fake_nvml_matches_scripted_counters() -> None:
    gpu = FakeGpu(tx=[2**32 - 1000, 2**32 - 10, 500, 1500], rx=[0, 4096, 8192, 8192],
                  value_type=1, used=[100, 500, 300])
    fake = FakeNvml([gpu])
    with Monitor(0, interval_s=0.001, nvml_module=fake) as mon:
        assert gpu.exhausted.wait(5.0)
        mon.mark("step")
    s = mon.summary()
    assert mon.nvml_available and mon.nvml_reason == "" and s["nvml_available"]
    assert s["pcie_tx_bytes"] == 2500 and s["pcie_rx_bytes"] == 8192
    nv = [x for x in mon.samples if x.nvml is not None]
    assert len(nv) == len(mon.samples) >= 4
    span = nv[-1].time_s - nv[0].time_s
    assert s["pcie_tx_mean_gbps"] == pytest.approx(2500 / span / 1e9)
    assert (s["peak_device_used_bytes"], s["peak_device_reserved_bytes"]) == (500, 10)
    assert (s["mean_util_gpu_pct"], s["mean_util_memory_pct"]) == (40, 20)
    assert (s["pcie_link_gen"], s["pcie_link_width"]) == (5, 16)
    assert [m.label for m in mon.marks] == ["step"]
    assert (fake.inits, fake.shutdowns) == (1, 1) and not mon.running


def test_monitor_survives_raising_reads() -> None:
    gpu = FakeGpu(tx=[0, 10, 20], rx=[0, 0, 0], memory_error=RuntimeError("boom"),
                  util_error=NVMLError(999))
    with Monitor(0, interval_s=0.001, nvml_module=FakeNvml([gpu])) as mon:
        assert gpu.exhausted.wait(5.0)
    samples = mon.samples
    assert len(samples) >= 3 and all(x.nvml is not None for x in samples)
    assert all(x.nvml.memory_used_bytes is None and x.nvml.util_gpu_pct is None for x in samples)
    assert mon.summary()["pcie_tx_bytes"] == 20


def test_monitor_without_nvml_keeps_host_figures(caplog: pytest.LogCaptureFixture) -> None:
    if nvml_status()[0]:
        pytest.skip("NVML works on this machine; the unavailable path is tested without a driver")
    event = threading.Event()
    with caplog.at_level(logging.WARNING, logger="offload"):
        with Monitor(0, interval_s=0.001) as mon:
            event.wait(0.02)
    assert not mon.nvml_available and mon.nvml_reason.startswith("NVML unavailable: ")
    samples = mon.samples
    assert len(samples) >= 2 and all(x.nvml is None for x in samples)
    assert all(x.rss_bytes and x.rss_bytes > 0 and x.host_available_bytes for x in samples)
    s = mon.summary()
    assert s["peak_rss_bytes"] > 0 and s["pcie_tx_bytes"] is None and s["nvml_reason"] == mon.nvml_reason
    assert not caplog.records


def test_monitor_cpu_device_and_bad_arguments() -> None:
    with Monitor("cpu", interval_s=0.001) as mon:
        pass
    assert not mon.nvml_available and "not a CUDA device" in mon.nvml_reason and mon.samples
    with pytest.raises(ValueError, match="interval_s"):
        Monitor(0, interval_s=0)
    with pytest.raises(ValueError, match="device"):
        Monitor("nonsense:7")
    with pytest.raises(ValueError, match="device"):
        Monitor(-1)


@pytest.mark.cuda
def test_monitor_counts_real_pcie_traffic() -> None:
    import torch

    if not torch.cuda.is_available() or not nvml_status()[0]:
        pytest.skip("needs a CUDA device and NVML")
    n = 256 << 20
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    with Monitor(torch.cuda.current_device(), interval_s=0.01) as mon:
        for _ in range(4):
            host.copy_(dev)  # device-to-host: the GPU transmits (TX)
            dev.copy_(host)  # host-to-device: the GPU receives (RX)
        torch.cuda.synchronize()
    s = mon.summary()
    assert mon.nvml_available, mon.nvml_reason
    assert s["peak_device_used_bytes"] and s["pcie_link_width"]
    if s["pcie_tx_source"] == "counters":
        assert s["pcie_tx_bytes"] >= 0.9 * 4 * n and s["pcie_rx_bytes"] >= 0.9 * 4 * n
    else:
        assert s["pcie_tx_source"] == "throughput" and s["pcie_tx_bytes"] > 0


def _run_python(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.stdout.split()


def test_import_does_not_import_pynvml_or_start_cuda() -> None:
    # torch itself imports pynvml when present (torch/cuda/__init__.py), so "pynvml not in
    # sys.modules" cannot hold after `import torch`. Instead block pynvml: our imports must not
    # need it, and CUDA must stay uninitialised.
    code = ("import sys; sys.modules['pynvml'] = None; "
            "import torch, offload.observe.monitor, offload.observe.nvml, offload.observe.hostmem; "
            "print(sys.modules['pynvml'] is None, torch.cuda.is_initialized())")
    assert _run_python(code) == ["True", "False"]


def test_import_does_not_initialise_nvml() -> None:
    code = ("import sys, torch, offload.observe.monitor, offload.observe.nvml, offload.observe.hostmem; "
            "m = sys.modules.get('pynvml'); "
            "print(m is None or (m.nvmlLib is None and m._nvmlLib_refcount == 0), "
            "torch.cuda.is_initialized())")
    assert _run_python(code) == ["True", "False"]


# -- host memory and cgroups -----------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_ancestor_limit_binds(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(root / "a" / "memory.max", "2000000\n")
    _write(root / "a" / "memory.current", "500000\n")
    _write(root / "a" / "memory.stat", "anon 400000\ninactive_file 100000\n")
    _write(root / "a" / "b" / "memory.max", "max\n")
    _write(root / "a" / "b" / "memory.current", "300000\n")
    _write(tmp_path / "proc", "0::/a/b\n")
    cg = hostmem.read_cgroup_memory(root, tmp_path / "proc")
    assert cg == hostmem.CgroupMemory(2, root / "a" / "b", 2000000, 400000, 1600000)
    assert hostmem.cgroup_limit_bytes(root, tmp_path / "proc") == 2000000
    assert hostmem.available_host_bytes(root, tmp_path / "proc") == 1600000


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "memory\n")
    _write(root / "memory.max", "max\n")
    _write(root / "memory.current", "12345\n")
    _write(tmp_path / "proc", "0::/\n")
    cg = hostmem.read_cgroup_memory(root, tmp_path / "proc")
    assert (cg.version, cg.limit_bytes, cg.usage_bytes, cg.headroom_bytes) == (2, None, 12345, None)
    assert hostmem.available_host_bytes(root, tmp_path / "proc") > 0


def test_cgroup_v1_hybrid_and_unmounted_host_path(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    mem = root / "memory"
    _write(mem / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    _write(mem / "memory.usage_in_bytes", "999\n")
    _write(mem / "docker" / "abc" / "memory.limit_in_bytes", f"{1 << 20}\n")
    _write(mem / "docker" / "abc" / "memory.usage_in_bytes", f"{1 << 19}\n")
    _write(mem / "docker" / "abc" / "memory.stat", "cache 5\ntotal_inactive_file 4096\n")
    _write(tmp_path / "proc", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    cg = hostmem.read_cgroup_memory(root, tmp_path / "proc")
    assert cg == hostmem.CgroupMemory(1, mem / "docker" / "abc", 1 << 20, (1 << 19) - 4096,
                                      (1 << 19) + 4096)
    assert hostmem.available_host_bytes(root, tmp_path / "proc") == (1 << 19) + 4096
    # Without a cgroup namespace the host's path is not mounted: the mount is our cgroup.
    _write(tmp_path / "proc2", "4:memory:/kubepods/pod1/xyz\n")
    cg = hostmem.read_cgroup_memory(root, tmp_path / "proc2")
    assert (cg.version, cg.path, cg.limit_bytes, cg.usage_bytes) == (1, mem, None, 999)


def test_no_memory_cgroup(tmp_path: Path) -> None:
    _write(tmp_path / "proc", "1:cpu:/\n")
    assert hostmem.read_cgroup_memory(tmp_path, tmp_path / "proc") is None
    assert hostmem.read_cgroup_memory(tmp_path, tmp_path / "missing") is None
    assert hostmem.available_host_bytes(tmp_path, tmp_path / "missing") > 0
    hostmem.read_cgroup_memory()  # the real machine's: must not raise
    assert hostmem.process_rss_bytes() > 0 and hostmem.system_available_bytes() > 0
