"""The offload internals the GPU check reaches past the public API for, imported here only, so a
move of offload's modules touches this one file."""
from offload.transfer.linkprobe import PROBE_BYTES, UNMEASURED, measure_link  # noqa: F401
from offload.transfer.cuda import CudaBackend  # noqa: F401
from offload.observe.nvml import nvml_status  # noqa: F401
