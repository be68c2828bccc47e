"""A thin, fault-tolerant NVML reader: PCIe traffic, device memory, utilization, link state.

Nothing here touches NVML at import time: ``pynvml`` is imported inside functions only, and every
entry point takes an optional module object so tests can pass a fake one.

Rules this module keeps:

1. A reading that is unsupported or raises becomes ``None``; ``NvmlDevice.read`` never raises.
   Each kind of failure is logged once at debug level per device. A kind that NVML reports as
   NOT_SUPPORTED is not asked again (the answer is static for a device).
2. Every ``nvmlInit`` is matched by exactly one ``nvmlShutdown``: ``NvmlLibrary`` counts its own
   references; each ``NvmlDevice`` holds one and gives it back in ``close()``.
3. Counter width. The PCIe byte counters (NVML_FI_DEV_PCIE_COUNT_TX/RX_BYTES) are documented as
   "can be wrapped". We take the width from the ``valueType`` NVML returns with the field (32 bits
   for an unsigned int, 64 for unsigned long long, ...). When the type is unknown we assume 32
   bits: modular arithmetic on the narrower width is still exact for a 64-bit counter whenever
   fewer than 2**32 bytes (4.29 GB) moved between two samples, while assuming 64 bits for a
   32-bit counter would turn every wrap into ~1.8e19 bytes. A 32-bit counter wraps after 68 ms at
   PCIe Gen5 x16's theoretical 63 GB/s, so samples must be closer than that (the monitor's default
   is 50 ms); one wrap between two samples is handled, two are not detectable.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from ..core.errors import OffloadError

logger = logging.getLogger(__name__)

#: Bytes per "KB" in nvmlDeviceGetPcieThroughput's KB/s. The NVML docs do not say; we assume 1024.
THROUGHPUT_KB_BYTES = 1024
#: Counter width assumed when NVML does not report a value type (see rule 3 above).
DEFAULT_COUNTER_BITS = 32

# NVML's nvmlValueType_t numbers -> counter width in bits (stable ABI values from nvml.h).
_VALUE_TYPE_BITS = {1: 32, 2: 8 * ctypes.sizeof(ctypes.c_ulong), 3: 64, 4: 64, 5: 32, 6: 16}
_VALUE_TYPE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class NvmlUnavailableError(OffloadError):
    """NVML cannot be used here; ``str(err)`` is "NVML unavailable: <reason>"."""


@dataclass(frozen=True)
class NvmlReading:
    """One NVML reading of one device; every field is ``None`` when unsupported or failed.

    TX is what the GPU transmits (device-to-host), RX what it receives (host-to-device).
    """

    pcie_tx_bytes: int | None = None  #: raw TX byte counter (wraps at 2**pcie_counter_bits)
    pcie_rx_bytes: int | None = None  #: raw RX byte counter
    pcie_counter_bits: int | None = None  #: width of the byte counters
    pcie_tx_kbps: int | None = None  #: TX throughput in KB/s over NVML's ~20 ms window (fallback)
    pcie_rx_kbps: int | None = None  #: RX throughput in KB/s (fallback)
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None  #: v2: excludes reserved; v1: includes it
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None  #: driver/firmware reservation; None under v1
    util_gpu_pct: int | None = None
    util_memory_pct: int | None = None
    pcie_link_gen: int | None = None  #: current generation; links downshift when idle
    pcie_link_width: int | None = None  #: current lane count


def counter_delta(prev: int, curr: int, bits: int) -> int:
    """Bytes counted from ``prev`` to ``curr`` on an unsigned ``bits``-wide counter that may wrap.

    Exact when the counter wrapped at most once between the two readings.
    """
    return (curr - prev) % (1 << bits)


def pcie_delta(prev: NvmlReading, curr: NvmlReading) -> tuple[int | None, int | None]:
    """(TX bytes, RX bytes) moved between two readings from the counters, wrap-safe; ``None``
    for a direction when either reading lacks its counter."""
    bits = curr.pcie_counter_bits or prev.pcie_counter_bits or DEFAULT_COUNTER_BITS
    tx = rx = None
    if prev.pcie_tx_bytes is not None and curr.pcie_tx_bytes is not None:
        tx = counter_delta(prev.pcie_tx_bytes, curr.pcie_tx_bytes, bits)
    if prev.pcie_rx_bytes is not None and curr.pcie_rx_bytes is not None:
        rx = counter_delta(prev.pcie_rx_bytes, curr.pcie_rx_bytes, bits)
    return tx, rx


def _error_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a binding's __str__ may itself call into a missing library
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_pynvml() -> ModuleType:
    import pynvml  # lazy: importing this package must not load NVML

    return pynvml


class NvmlLibrary:
    """A pynvml module object with reference-counted ``nvmlInit``/``nvmlShutdown`` (rule 2).

    Not a singleton: each owner (a Monitor, a test) makes its own. ``module=None`` imports the
    real ``pynvml`` on first use.
    """

    def __init__(self, module: Any | None = None) -> None:
        self._module = module
        self._refs = 0
        self._lock = threading.Lock()

    def acquire(self) -> Any:
        """Initialise NVML if this is the first reference; return the module.

        Raises ``NvmlUnavailableError`` when pynvml, the library or the driver is missing.
        """
        with self._lock:
            if self._module is None:
                try:
                    self._module = _import_pynvml()
                except ImportError as exc:
                    raise NvmlUnavailableError(f"NVML unavailable: pynvml not importable ({exc})") from exc
            if self._refs == 0:
                try:
                    self._module.nvmlInit()
                except Exception as exc:  # LibraryNotFound, DriverNotLoaded, ...
                    raise NvmlUnavailableError(f"NVML unavailable: {_error_text(exc)}") from exc
            self._refs += 1
            return self._module

    def release(self) -> None:
        """Drop one reference; shut NVML down when the last one goes."""
        with self._lock:
            if self._refs == 0:
                return
            self._refs -= 1
            if self._refs == 0:
                try:
                    self._module.nvmlShutdown()
                except Exception as exc:
                    logger.debug("nvmlShutdown failed: %s", _error_text(exc))


def nvml_status(module: Any | None = None) -> tuple[bool, str]:
    """(True, "") when NVML works and sees a GPU, else (False, "NVML unavailable: <reason>").

    Never raises. ``module`` is a pynvml-like object (default: the real ``pynvml``).
    """
    lib = NvmlLibrary(module)
    try:
        nv = lib.acquire()
    except NvmlUnavailableError as exc:
        return False, str(exc)
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception as exc:
        return False, f"NVML unavailable: {_error_text(exc)}"
    finally:
        lib.release()
    if count < 1:
        return False, "NVML unavailable: no GPU found (nvmlDeviceGetCount() == 0)"
    return True, ""


def _uuid_key(value: Any) -> str:
    """Canonical form for comparing torch's and NVML's UUIDs: 32 lowercase hex digits.

    torch gives ``_CUuuid`` (``.bytes``, str "xxxxxxxx-xxxx-..."); NVML gives "GPU-xxxxxxxx-...".
    """
    raw = getattr(value, "bytes", None)
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        return bytes(raw).hex()
    text = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.replace("-", "")


def _torch_uuid(cuda_index: int) -> Any | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)


class NvmlDevice:
    """One GPU seen through NVML. Open with ``NvmlDevice.open``; ``read()`` never raises.

    Reads come from one thread at a time (the monitor's sampler).
    """

    def __init__(self, library: NvmlLibrary, module: Any, handle: Any, nvml_index: int | None) -> None:
        self._library = library
        self._nv = module
        self._handle = handle
        self.nvml_index = nvml_index  #: NVML's index of the device, when known
        self._closed = False
        self._logged: set[str] = set()
        self._unsupported: set[str] = set()
        self._mem_v2 = hasattr(module, "nvmlMemory_v2")
        fi = (getattr(module, "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", None),
              getattr(module, "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", None))
        self._fields = fi if None not in fi else None  # constants missing in an old pynvml

    @classmethod
    def open(cls, cuda_index: int, *, library: NvmlLibrary | None = None,
             cuda_uuid: Any | None = None) -> NvmlDevice:
        """Open the NVML device behind CUDA device ``cuda_index``.

        Matched by UUID (``cuda_uuid``, else ``torch.cuda.get_device_properties(i).uuid``), since
        CUDA and NVML number devices differently under CUDA_VISIBLE_DEVICES. Without a UUID, or
        when none matches, falls back to NVML index ``cuda_index`` with a warning.
        Raises ``NvmlUnavailableError`` when NVML cannot be initialised or has no devices.
        """
        library = library or NvmlLibrary()
        nv = library.acquire()
        try:
            count = nv.nvmlDeviceGetCount()
            if count < 1:
                raise NvmlUnavailableError("NVML unavailable: no GPU found (nvmlDeviceGetCount() == 0)")
            if cuda_uuid is None:
                try:
                    cuda_uuid = _torch_uuid(cuda_index)
                except Exception as exc:
                    logger.debug("no CUDA UUID for device %d: %s", cuda_index, _error_text(exc))
            if cuda_uuid is not None:
                want = _uuid_key(cuda_uuid)
                for i in range(count):
                    handle = nv.nvmlDeviceGetHandleByIndex(i)
                    if _uuid_key(nv.nvmlDeviceGetUUID(handle)) == want:
                        return cls(library, nv, handle, i)
                logger.warning("no NVML device has the UUID of CUDA device %d (%s, MIG?); "
                               "using NVML index %d", cuda_index, cuda_uuid, cuda_index)
            else:
                logger.warning("CUDA device %d has no UUID available; using NVML index %d, which is "
                               "wrong if CUDA_VISIBLE_DEVICES reorders devices", cuda_index, cuda_index)
            if not 0 <= cuda_index < count:
                raise NvmlUnavailableError(
                    f"NVML unavailable: device index {cuda_index} out of range (NVML sees {count})")
            return cls(library, nv, nv.nvmlDeviceGetHandleByIndex(cuda_index), cuda_index)
        except NvmlUnavailableError:
            library.release()
            raise
        except Exception as exc:
            library.release()
            raise NvmlUnavailableError(f"NVML unavailable: {_error_text(exc)}") from exc

    def close(self) -> None:
        """Give back this device's NVML reference; idempotent."""
        if not self._closed:
            self._closed = True
            self._library.release()

    def __enter__(self) -> NvmlDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _try(self, kind: str, fn: Callable[[], Any]) -> Any | None:
        """Rule 1: call ``fn``; on failure log once per kind and return None."""
        if kind in self._unsupported:
            return None
        try:
            return fn()
        except Exception as exc:
            self._note_failure(kind, exc)
            return None

    def _note_failure(self, kind: str, exc: BaseException | int) -> None:
        code = exc if isinstance(exc, int) else getattr(exc, "value", None)
        static = (getattr(self._nv, "NVML_ERROR_NOT_SUPPORTED", 3),
                  getattr(self._nv, "NVML_ERROR_FUNCTION_NOT_FOUND", 13))
        if code in static or isinstance(exc, AttributeError):  # the answer will not change
            self._unsupported.add(kind)
        if kind not in self._logged:
            self._logged.add(kind)
            what = f"NVML return code {exc}" if isinstance(exc, int) else _error_text(exc)
            logger.debug("NVML %s reading unavailable: %s", kind, what)

    def _read_counters(self) -> tuple[int | None, int | None, int | None]:
        """(TX counter, RX counter, width in bits) from the field values; None where missing."""
        kinds = ("pcie_tx_counter", "pcie_rx_counter")
        if self._fields is None or all(k in self._unsupported for k in kinds):
            return None, None, None
        values = self._try("pcie_counters", lambda: self._nv.nvmlDeviceGetFieldValues(
            self._handle, list(self._fields)))
        if values is None:
            return None, None, None
        out: list[int | None] = [None, None]
        bits = None
        for i, (kind, v) in enumerate(zip(kinds, values)):
            if kind in self._unsupported:
                continue
            if v.nvmlReturn != 0:
                self._note_failure(kind, int(v.nvmlReturn))
                continue
            vtype = getattr(v, "valueType", None)
            out[i] = int(getattr(v.value, _VALUE_TYPE_MEMBER.get(vtype, "ullVal")))
            bits = _VALUE_TYPE_BITS.get(vtype, DEFAULT_COUNTER_BITS)
        return out[0], out[1], bits

    def read(self) -> NvmlReading:
        """Take one reading. Never raises; unsupported or failing parts are ``None``."""
        nv, h = self._nv, self._handle
        tx, rx, bits = self._read_counters()
        tx_kbps = rx_kbps = None
        if tx is None:
            tx_kbps = self._try("pcie_throughput_tx", lambda: nv.nvmlDeviceGetPcieThroughput(
                h, nv.NVML_PCIE_UTIL_TX_BYTES))
        if rx is None:
            rx_kbps = self._try("pcie_throughput_rx", lambda: nv.nvmlDeviceGetPcieThroughput(
                h, nv.NVML_PCIE_UTIL_RX_BYTES))
        mem = None
        if self._mem_v2:  # v2 separates the driver's reservation from "used"
            mem = self._try("memory_v2", lambda: nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2))
        if mem is None:
            mem = self._try("memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
        util = self._try("utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h))
        return NvmlReading(
            pcie_tx_bytes=tx, pcie_rx_bytes=rx,
            pcie_counter_bits=bits if (tx is not None or rx is not None) else None,
            pcie_tx_kbps=tx_kbps, pcie_rx_kbps=rx_kbps,
            memory_total_bytes=getattr(mem, "total", None),
            memory_used_bytes=getattr(mem, "used", None),
            memory_free_bytes=getattr(mem, "free", None),
            memory_reserved_bytes=getattr(mem, "reserved", None),
            util_gpu_pct=getattr(util, "gpu", None),
            util_memory_pct=getattr(util, "memory", None),
            pcie_link_gen=self._try("link_gen", lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
            pcie_link_width=self._try("link_width", lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
        )
