"""``Monitor``: a background NVML + psutil sampler, usable alone as a context manager.

    with offload.Monitor("cuda:0", interval_s=0.05) as mon:
        train_step()
        mon.mark("step 1 done")
    print(mon.summary())

Rules:

1. Sampling runs on the monitor's own daemon thread, never on the training thread: one NVML
   throughput read blocks ~20 ms.
2. A failed read never stops the sampler; that figure of that sample is ``None``. Each kind of
   failure is logged once at debug level.
3. Without a GPU, driver or pynvml the monitor still samples the host figures and says why NVML is
   off in ``nvml_reason``; nothing raises, nothing is logged above debug level.
4. The NVML module is injectable (``nvml_module=``) so tests drive it with a fake; no environment
   switches.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..core.errors import OffloadError, warn
from .hostmem import process_rss_bytes, read_cgroup_memory, system_available_bytes
from .nvml import (DEFAULT_COUNTER_BITS, THROUGHPUT_KB_BYTES, NvmlDevice, NvmlLibrary, NvmlReading,
                   NvmlUnavailableError, counter_delta)

logger = logging.getLogger(__name__)

#: Bytes per second that wraps a 32-bit PCIe counter soonest: Gen5 x16 theory, one direction.
_FASTEST_LINK_BYTES_S = 64e9


@dataclass(frozen=True)
class Sample:
    """One sample; a figure that could not be read is ``None``."""

    time_s: float  #: time.perf_counter() when the sample began
    rss_bytes: int | None  #: this process's resident set size
    host_available_bytes: int | None  #: min(system available, cgroup limit - cgroup usage)
    cgroup_limit_bytes: int | None  #: binding cgroup memory limit; None when unlimited
    nvml: NvmlReading | None  #: None when NVML is unavailable or the read failed


@dataclass(frozen=True)
class Mark:
    """A labelled instant on the monitor's clock (time.perf_counter)."""

    label: str
    time_s: float


def _resolve_cuda_index(device: int | str | torch.device | None) -> int | None:
    """The CUDA index to watch, or None for a non-CUDA device. Starts no CUDA context."""
    if isinstance(device, bool) or (isinstance(device, int) and device < 0):
        raise ValueError(f"Monitor(device={device!r}): expected a CUDA index >= 0, a device string "
                         f"such as 'cuda:0', a torch.device or None")
    if isinstance(device, int):
        return device
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"Monitor(device={device!r}): not a device ({exc}); pass e.g. 'cuda:0'") from exc
        if device.type != "cuda":
            return None
        if device.index is not None:
            return device.index
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def _pcie_direction(points: list[tuple[float, NvmlReading]], counter: str, kbps: str
                    ) -> tuple[int | None, float | None, float | None, str | None]:
    """(bytes, mean GB/s, peak GB/s, source) for one direction over the readings.

    Counters: the sum of wrap-safe deltas between consecutive readings that have them.
    Throughput (fallback): KB/s integrated with the trapezoid rule over the sample times.
    """
    pts = [(t, getattr(r, counter), r.pcie_counter_bits) for t, r in points if getattr(r, counter) is not None]
    if len(pts) >= 2:
        total, peak = 0, 0.0
        for (t0, c0, b0), (t1, c1, b1) in zip(pts, pts[1:]):
            delta = counter_delta(c0, c1, b1 or b0 or DEFAULT_COUNTER_BITS)
            total += delta
            if t1 > t0:
                peak = max(peak, delta / (t1 - t0))
        span = pts[-1][0] - pts[0][0]
        return total, (total / span / 1e9 if span > 0 else None), peak / 1e9, "counters"
    rates = [(t, getattr(r, kbps) * THROUGHPUT_KB_BYTES) for t, r in points if getattr(r, kbps) is not None]
    if not rates:
        return None, None, None, None
    total_f = sum((r0 + r1) / 2 * (t1 - t0) for (t0, r0), (t1, r1) in zip(rates, rates[1:]))
    span = rates[-1][0] - rates[0][0]
    mean = total_f / span if span > 0 else rates[0][1]
    return round(total_f), mean / 1e9, max(r for _, r in rates) / 1e9, "throughput"


def _stat(values: list[Any], fn: Callable[[list[Any]], Any]) -> Any:
    values = [v for v in values if v is not None]
    return fn(values) if values else None


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Figures over a run of samples; every key is always present, ``None`` when unknown.

    Bytes are bytes, rates GB/s (1e9 B/s), utilization in percent, times in seconds. TX is
    device-to-host, RX host-to-device. Link generation and width are the highest seen (idle
    links downshift).
    """
    nv = [(s.time_s, s.nvml) for s in samples if s.nvml is not None]
    tx, tx_mean, tx_peak, tx_src = _pcie_direction(nv, "pcie_tx_bytes", "pcie_tx_kbps")
    rx, rx_mean, rx_peak, rx_src = _pcie_direction(nv, "pcie_rx_bytes", "pcie_rx_kbps")
    readings = [r for _, r in nv]
    return {
        "samples": len(samples),
        "duration_s": samples[-1].time_s - samples[0].time_s if samples else 0.0,
        "peak_rss_bytes": _stat([s.rss_bytes for s in samples], max),
        "min_host_available_bytes": _stat([s.host_available_bytes for s in samples], min),
        "cgroup_limit_bytes": _stat([s.cgroup_limit_bytes for s in samples], min),
        "pcie_tx_bytes": tx, "pcie_tx_mean_gbps": tx_mean, "pcie_tx_peak_gbps": tx_peak,
        "pcie_tx_source": tx_src,
        "pcie_rx_bytes": rx, "pcie_rx_mean_gbps": rx_mean, "pcie_rx_peak_gbps": rx_peak,
        "pcie_rx_source": rx_src,
        "peak_device_used_bytes": _stat([r.memory_used_bytes for r in readings], max),
        "peak_device_reserved_bytes": _stat([r.memory_reserved_bytes for r in readings], max),
        "mean_util_gpu_pct": _stat([r.util_gpu_pct for r in readings], lambda v: sum(v) / len(v)),
        "mean_util_memory_pct": _stat([r.util_memory_pct for r in readings], lambda v: sum(v) / len(v)),
        "pcie_link_gen": _stat([r.pcie_link_gen for r in readings], max),
        "pcie_link_width": _stat([r.pcie_link_width for r in readings], max),
    }


class Monitor:
    """Samples host memory and, when NVML works, the GPU every ``interval_s`` seconds.

    ``device``: a CUDA index, ``"cuda:N"``, a ``torch.device`` or None (the current CUDA device,
    0 if CUDA is not initialised). A non-CUDA device samples the host only. ``nvml_module``: a
    pynvml-like object to use instead of the real ``pynvml`` (tests). Thread-safe.
    ``start()`` clears the samples and marks of a previous run; on a CUDA machine it reads the
    device's UUID through torch, which initialises CUDA if nothing has yet.
    """

    def __init__(self, device: int | str | torch.device | None = None, interval_s: float = 0.05,
                 *, nvml_module: Any | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"Monitor(interval_s={interval_s!r}): expected seconds > 0, e.g. 0.05")
        self.interval_s = float(interval_s)
        self._device_arg = device
        self._cuda_index = _resolve_cuda_index(device)
        self._nvml_module = nvml_module
        self._lock = threading.Lock()  # guards samples, marks and _thread
        self._life = threading.Lock()  # serialises start() and stop()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: NvmlDevice | None = None
        self._samples: list[Sample] = []
        self._marks: list[Mark] = []
        self._logged: set[str] = set()
        self.nvml_available: bool = False  #: True once start() opened the device through NVML
        self.nvml_reason: str = "NVML unavailable: monitor not started"  #: why not, else ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Monitor:
        """Open NVML (if it works) and start the sampler thread."""
        with self._life:
            if self._thread is not None:
                raise OffloadError("Monitor.start(): already running; call stop() before starting again")
            with self._lock:
                self._samples, self._marks = [], []
            self._open_nvml()
            self._stop.clear()
            thread = threading.Thread(target=self._run, name="offload-monitor", daemon=True)
            with self._lock:
                self._thread = thread
            thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (one last sample closes the window), join the thread, release NVML."""
        with self._life:
            thread = self._thread
            if thread is None:
                return
            self._stop.set()
            thread.join()
            with self._lock:
                self._thread = None
            if self._nvml is not None:
                self._nvml.close()
                self._nvml = None

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_nvml(self) -> None:
        self.nvml_available, self._nvml = False, None
        if self._cuda_index is None:
            self.nvml_reason = f"NVML unavailable: device {self._device_arg!r} is not a CUDA device"
            return
        try:
            self._nvml = NvmlDevice.open(self._cuda_index, library=NvmlLibrary(self._nvml_module))
        except NvmlUnavailableError as exc:
            self.nvml_reason = str(exc)
        except Exception as exc:  # rule 3: never let NVML trouble escape
            self.nvml_reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
        else:
            self.nvml_available, self.nvml_reason = True, ""
        if not self.nvml_available:
            logger.debug("monitor samples the host only: %s", self.nvml_reason)

    # -- sampling ---------------------------------------------------------------------------
    def _run(self) -> None:
        start = time.perf_counter()
        tick = 0
        while True:
            self._record(self._take_safe())
            tick += 1
            next_at = start + tick * self.interval_s
            now = time.perf_counter()
            if now > next_at:  # a slow read: skip the missed slots rather than burst
                tick += int((now - next_at) // self.interval_s) + 1
                next_at = start + tick * self.interval_s
            if self._stop.wait(next_at - now):
                break
        self._record(self._take_safe())

    def _take_safe(self) -> Sample:
        try:
            return self._take()
        except Exception as exc:  # rule 2: the sampler outlives any bug in a read
            self._log_once("sample", exc)
            return Sample(time.perf_counter(), None, None, None, None)

    def _guard(self, kind: str, fn: Callable[[], Any]) -> Any:
        """Rule 2: one failing read gives None and one debug line per kind, never an exception."""
        try:
            return fn()
        except Exception as exc:
            self._log_once(kind, exc)
            return None

    def _log_once(self, kind: str, exc: BaseException) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.debug("monitor: %s read failed: %s: %s", kind, type(exc).__name__, exc)

    def _take(self) -> Sample:
        t = time.perf_counter()
        rss = self._guard("rss", process_rss_bytes)
        available = self._guard("available", system_available_bytes)
        cgroup = self._guard("cgroup", read_cgroup_memory)
        if cgroup is not None and cgroup.headroom_bytes is not None and available is not None:
            available = min(available, cgroup.headroom_bytes)
        reading = self._guard("nvml", self._nvml.read) if self._nvml is not None else None
        if reading is not None and reading.pcie_counter_bits and "wrap" not in self._logged:
            self._logged.add("wrap")
            if self.interval_s * _FASTEST_LINK_BYTES_S >= 2 ** reading.pcie_counter_bits:
                warn(f"Monitor(interval_s={self.interval_s:g}): {reading.pcie_counter_bits}-bit PCIe counters "
                     f"can wrap more than once per interval at full link speed, so traffic may be "
                     f"undercounted; use interval_s < "
                     f"{2 ** reading.pcie_counter_bits / _FASTEST_LINK_BYTES_S:.3f}")
        return Sample(t, rss, available, None if cgroup is None else cgroup.limit_bytes, reading)

    def _record(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)

    # -- results ----------------------------------------------------------------------------
    def mark(self, label: str) -> Mark:
        """Record ``label`` at time.perf_counter() now, to align the runtime's own timeline."""
        m = Mark(str(label), time.perf_counter())
        with self._lock:
            self._marks.append(m)
        return m

    @property
    def samples(self) -> list[Sample]:
        """A copy of the samples so far, oldest first."""
        with self._lock:
            return list(self._samples)

    @property
    def marks(self) -> list[Mark]:
        """A copy of the marks so far, oldest first."""
        with self._lock:
            return list(self._marks)

    @property
    def running(self) -> bool:
        """Whether the sampler thread is running."""
        with self._lock:
            return self._thread is not None

    def summary(self) -> dict[str, Any]:
        """``summarize(self.samples)`` plus ``nvml_available`` and ``nvml_reason``."""
        out = summarize(self.samples)
        out["nvml_available"] = self.nvml_available
        out["nvml_reason"] = self.nvml_reason
        return out
