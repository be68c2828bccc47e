"""Keep, offload to pinned host memory, or recompute every activation autograd saves.

    hc = offload.HybridCheckpointer(model, policy="auto", device_budget="12GiB", host_budget="64GiB")
    with hc:
        loss = model(batch).loss
    loss.backward()
    print(hc.report())

Importing this package starts neither CUDA nor NVML.
"""
import logging

from scheduler.plan import Action

from .checkpointer import HybridCheckpointer
from .core.attach import Attachment
from .transfer.emulated import EmulatedBackend
from .core.errors import OffloadError, OffloadWarning
from .transfer.hostpool import HostPool
from .observe.monitor import Monitor
from .observe.peakmem import PeakMemory
from .core.policy import RegionSite, TensorSite
from .core.verify import Verify
from .observe.report import Report
from .observe.trace import TraceRecorder
from .transfer.backend import TransferBackend

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"  # the one source: pyproject.toml reads it

__all__ = [
    # the runtime
    "HybridCheckpointer", "Attachment", "Action", "RegionSite", "TensorSite", "OffloadError", "OffloadWarning",
    "Verify",
    # what it reports
    "Report", "TraceRecorder", "Monitor", "PeakMemory",
    # mechanism, for tests and custom setups
    "TransferBackend", "EmulatedBackend", "HostPool",
]
